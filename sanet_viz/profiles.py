"""Per-class reference profiles of attention gates (``profiles.npz``, written by ``reproduce``), and
the nearest classes of one image's gate profile at each depth (shown by the app's depth view).

Two layouts of the file, both plain arrays (no pickles):

- SA (SANet50; format ``sanet-viz profiles 1``, as ever): ``channel`` and ``spatial``, each
  (depths, classes, groups): every class's mean channel and spatial gate per group.
- SE and ECA (format ``sanet-viz profiles 2``): ``kind``, ``unit`` ("channel"), ``branches``
  ("channel"), ``widths`` (channels per depth: 256 ... 2048) and ``channel`` (depths, classes,
  widest depth's channels), NaN beyond each depth's own width.

Both record ``model`` (the registry key), ``pretrained``, ``weights_source`` and ``images``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .correlation import nearest_classes, profile_of

__all__ = ["ClassProfiles", "NearestClass", "load_profiles", "nearest_classes_for", "PROFILES_FORMAT",
           "PROFILES_FORMAT_CHANNEL"]

PROFILES_FORMAT = "sanet-viz profiles 1"  # SA: channel and spatial per group
PROFILES_FORMAT_CHANNEL = "sanet-viz profiles 2"  # SE, ECA: one gate per channel, widths per depth


@dataclass(frozen=True)
class ClassProfiles:
    """Per-class mean gate profiles at every depth (from ``profiles.npz``), in the model's unit."""

    classes: np.ndarray  # (K,) class indices
    labels: list[str]  # (K,) class names
    counts: np.ndarray  # (K,) images per class
    depths: list[str]  # depth names in depth order (SA_2_1 ..., SE_2_1 ...)
    channel: np.ndarray  # (D, K, W) mean channel gate per group (SA) or channel (SE, ECA; NaN beyond widths)
    spatial: np.ndarray | None  # (D, K, G) mean spatial gate per group (SA); None without a spatial branch
    model: str
    pretrained: bool
    weights_source: str
    images: int
    kind: str = "SA"  # "SA", "SE", "ECA"
    unit: str = "group"  # what one value is: an SA group's mean, or one channel
    widths: tuple[int, ...] | None = None  # gates per branch at each depth; None: W everywhere

    @property
    def branches(self) -> tuple[str, ...]:
        return ("channel",) if self.spatial is None else ("channel", "spatial")

    def width(self, depth: str) -> int:
        """Gates per branch at ``depth`` (SA: its groups; SE, ECA: the module's channels)."""
        return self.channel.shape[2] if self.widths is None else int(self.widths[self.depths.index(depth)])

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz, no pickles) atomically; :func:`load_profiles` reads it back."""
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        common: dict[str, Any] = {
            "classes": self.classes.astype(np.int64), "labels": np.array(self.labels, dtype=str),
            "counts": self.counts.astype(np.int64), "depths": np.array(self.depths, dtype=str),
            "channel": self.channel.astype(np.float32)}
        about: dict[str, Any] = {
            "model": np.array(self.model), "pretrained": np.array(bool(self.pretrained)),
            "weights_source": np.array(str(self.weights_source)), "images": np.array(self.images, dtype=np.int64)}
        if self.kind == "SA":  # the layout the app has always read
            assert self.spatial is not None
            np.savez_compressed(tmp, **common, spatial=self.spatial.astype(np.float32), **about,
                                format=np.array(PROFILES_FORMAT))
        else:
            widths = [self.width(d) for d in self.depths]
            extra = {} if self.spatial is None else {"spatial": self.spatial.astype(np.float32)}
            np.savez_compressed(tmp, **common, **extra, **about, kind=np.array(self.kind), unit=np.array(self.unit),
                                branches=np.array(self.branches, dtype=str), widths=np.array(widths, np.int64),
                                format=np.array(PROFILES_FORMAT_CHANNEL))
        os.replace(tmp, path)
        return path

    def reference(self, depth: str) -> np.ndarray:
        """(K, width x branches): each class's profile at ``depth``, its branches one after another
        (SA: [channel, spatial]; SE, ECA: channel), as correlation.profile_of makes an image's."""
        d, w = self.depths.index(depth), self.width(depth)
        parts = [self.channel[d, :, :w]] + ([] if self.spatial is None else [self.spatial[d, :, :w]])
        return np.concatenate(parts, axis=1).astype(np.float64)


class NearestClass(NamedTuple):
    index: int  # ImageNet class index
    label: str
    r: float  # Pearson correlation of the image's profile with the class's mean profile


def load_profiles(path: str | Path) -> ClassProfiles:
    """Read a ``profiles.npz`` written by ``reproduce``, SA or SE/ECA (no pickles are loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable profiles file ({exc})") from exc
    kind = str(fields.get("kind", "SA"))
    needed = {"classes", "labels", "counts", "depths", "channel"} | ({"spatial"} if kind == "SA" else {"widths"})
    if not needed <= set(fields):
        raise ValueError(f"{path}: not a sanet-viz profiles file (missing {', '.join(sorted(needed - set(fields)))})")
    channel, spatial = fields["channel"], fields.get("spatial")
    depths = [str(d) for d in fields["depths"]]
    k = len(fields["classes"])
    if channel.ndim != 3 or channel.shape[:2] != (len(depths), k) or \
            (spatial is not None and spatial.shape != channel.shape):
        raise ValueError(f"{path}: inconsistent profile shapes {channel.shape} / "
                         f"{None if spatial is None else spatial.shape}")
    widths = None
    if kind != "SA":
        widths = tuple(int(w) for w in fields["widths"])
        if len(widths) != len(depths) or not all(0 < w <= channel.shape[2] for w in widths):
            raise ValueError(f"{path}: widths {widths} do not fit the profiles {channel.shape}")
    return ClassProfiles(fields["classes"].astype(np.int64), [str(s) for s in fields["labels"]],
                         fields["counts"].astype(np.int64), depths, channel, spatial,
                         str(fields.get("model", "sanet50")), bool(fields.get("pretrained", False)),
                         str(fields.get("weights_source", "")), int(fields.get("images", 0)), kind=kind,
                         unit=str(fields.get("unit", "group")), widths=widths)


def nearest_classes_for(result_gates: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]] | Any | None,
                        profiles: ClassProfiles | str | Path, k: int = 5) -> dict[str, list[NearestClass]]:
    """For one image's gates (depth name -> branch -> values: SA's {"channel": (G,), "spatial": (G,)}
    as ``ModelResult.sa_gates``, SE's or ECA's {"channel": (C,)}; or an ``attention.GateProfile``),
    the ``k`` classes whose mean profile correlates best with the image's at each depth, best first.

    Depths missing from either side are left out (a model without gates, or gates of another
    kind than the profiles': SA_* vs SE_*, give ``{}``).
    """
    if isinstance(profiles, (str, Path)):
        profiles = load_profiles(profiles)
    if result_gates is not None and not isinstance(result_gates, Mapping):
        result_gates = result_gates.values  # a GateProfile: depth -> branch -> values
    if not result_gates:
        return {}
    out: dict[str, list[NearestClass]] = {}
    for depth in profiles.depths:
        if depth not in result_gates:
            continue
        profile = profile_of(result_gates, depth)
        reference = profiles.reference(depth)
        if profile.shape[0] != reference.shape[1]:
            if profiles.unit == "group":
                raise ValueError(f"{depth}: the image has {profile.shape[0] // 2} groups, the profiles "
                                 f"{reference.shape[1] // 2}")
            raise ValueError(f"{depth}: the image has {profile.shape[0]} gates, the profiles "
                             f"{reference.shape[1]} ({profiles.unit}s)")
        out[depth] = [NearestClass(int(profiles.classes[i]), profiles.labels[i], r)
                      for i, r in nearest_classes(profile, reference, k)]
    return out
