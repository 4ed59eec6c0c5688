"""Per-class reference profiles of SA gates (``profiles.npz``, written by ``reproduce``), and the
nearest classes of one image's SA profile at each depth (shown by the app's depth view)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .correlation import nearest_classes, profile_of

__all__ = ["ClassProfiles", "NearestClass", "load_profiles", "nearest_classes_for", "PROFILES_FORMAT"]

PROFILES_FORMAT = "sanet-viz profiles 1"


@dataclass(frozen=True)
class ClassProfiles:
    """Per-class mean SA gate profiles at every depth (from ``profiles.npz``)."""

    classes: np.ndarray  # (K,) class indices
    labels: list[str]  # (K,) class names
    counts: np.ndarray  # (K,) images per class
    depths: list[str]  # paper names in depth order
    channel: np.ndarray  # (D, K, G) mean channel gate per group
    spatial: np.ndarray  # (D, K, G) mean spatial gate per group
    model: str
    pretrained: bool
    weights_source: str
    images: int

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz, no pickles) atomically; :func:`load_profiles` reads it back."""
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(
            tmp, classes=self.classes.astype(np.int64), labels=np.array(self.labels, dtype=str),
            counts=self.counts.astype(np.int64), depths=np.array(self.depths, dtype=str),
            channel=self.channel.astype(np.float32), spatial=self.spatial.astype(np.float32),
            model=np.array(self.model), pretrained=np.array(bool(self.pretrained)),
            weights_source=np.array(str(self.weights_source)), images=np.array(self.images, dtype=np.int64),
            format=np.array(PROFILES_FORMAT))
        os.replace(tmp, path)
        return path

    def reference(self, depth: str) -> np.ndarray:
        """(K, 2G): each class's [channel, spatial] profile at ``depth`` (as correlation.profile_of)."""
        d = self.depths.index(depth)
        return np.concatenate([self.channel[d], self.spatial[d]], axis=1).astype(np.float64)


class NearestClass(NamedTuple):
    index: int  # ImageNet class index
    label: str
    r: float  # Pearson correlation of the image's profile with the class's mean profile


def load_profiles(path: str | Path) -> ClassProfiles:
    """Read a ``profiles.npz`` written by ``reproduce`` (no pickles are loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable profiles file ({exc})") from exc
    needed = {"classes", "labels", "counts", "depths", "channel", "spatial"}
    if not needed <= set(fields):
        raise ValueError(f"{path}: not a sanet-viz profiles file (missing {', '.join(sorted(needed - set(fields)))})")
    channel, spatial = fields["channel"], fields["spatial"]
    depths = [str(d) for d in fields["depths"]]
    k = len(fields["classes"])
    if channel.shape != spatial.shape or channel.ndim != 3 or channel.shape[:2] != (len(depths), k):
        raise ValueError(f"{path}: inconsistent profile shapes {channel.shape} / {spatial.shape}")
    return ClassProfiles(fields["classes"].astype(np.int64), [str(s) for s in fields["labels"]],
                         fields["counts"].astype(np.int64), depths, channel, spatial,
                         str(fields.get("model", "sanet50")), bool(fields.get("pretrained", False)),
                         str(fields.get("weights_source", "")), int(fields.get("images", 0)))


def nearest_classes_for(result_gates: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]] | None,
                        profiles: ClassProfiles | str | Path, k: int = 5) -> dict[str, list[NearestClass]]:
    """For one image's SA gates (paper name -> {"channel": (G,), "spatial": (G,)}), the ``k`` classes
    whose mean profile correlates best with the image's at each depth, best first.

    Depths missing from either side are left out (a model without SA layers gives ``{}``).
    """
    if isinstance(profiles, (str, Path)):
        profiles = load_profiles(profiles)
    if not result_gates:
        return {}
    out: dict[str, list[NearestClass]] = {}
    for depth in profiles.depths:
        if depth not in result_gates:
            continue
        profile = profile_of(result_gates, depth)
        reference = profiles.reference(depth)
        if profile.shape[0] != reference.shape[1]:
            raise ValueError(f"{depth}: the image has {profile.shape[0] // 2} groups, the profiles "
                             f"{reference.shape[1] // 2}")
        out[depth] = [NearestClass(int(profiles.classes[i]), profiles.labels[i], r)
                      for i, r in nearest_classes(profile, reference, k)]
    return out


