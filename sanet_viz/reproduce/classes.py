"""Class names and labels -> class indices: the ImageNet devkit, WordNet-id lists, JSON maps, label files."""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ClassMap", "DatasetError", "read_class_map", "read_labels", "WNID_RE"]

WNID_RE = re.compile(r"^n\d{8}$")


class DatasetError(ValueError):
    """A data folder, class file or label file that cannot be used; the message says how to fix it."""



@dataclass(frozen=True)
class ClassMap:
    """Folder or label names (WordNet ids, ...) -> class index; ``devkit_ids`` for devkit labels."""

    by_name: dict[str, int]
    source: str
    devkit_ids: dict[int, int] = field(default_factory=dict)  # ILSVRC2012_ID (1-based) -> index
    devkit_ground_truth: list[int] | None = None  # the devkit's val labels, if it was an archive


def _devkit_from_meta(data: bytes, source: str) -> ClassMap:
    """The 1000 leaf synsets of the devkit's meta.mat: index = position in sorted WordNet-id order.

    That is the order of torchvision's ImageNet classes (ImageFolder over the wnid folders), which
    every pretrained ImageNet model here predicts in.
    """
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - scipy comes with the dev requirements
        raise DatasetError(f"{source}: reading the devkit's meta.mat needs scipy (pip install scipy)") from exc
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    except Exception as exc:  # scipy raises many types for a bad file
        raise DatasetError(f"{source}: not the ImageNet devkit's meta.mat ({exc})") from exc
    names = synsets.dtype.names or ()
    if not {"ILSVRC2012_ID", "WNID", "num_children"} <= set(names):
        raise DatasetError(f"{source}: meta.mat has no ILSVRC2012_ID/WNID/num_children synsets")
    leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in np.atleast_1d(synsets)
              if int(s["num_children"]) == 0]
    order = {wnid: i for i, wnid in enumerate(sorted(w for _, w in leaves))}
    return ClassMap(order, f"ImageNet devkit {source} (sorted WordNet ids)",
                    {ilsvrc_id: order[wnid] for ilsvrc_id, wnid in leaves})


def _read_devkit_archive(path: Path) -> ClassMap:
    meta = truth = None
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith("data/meta.mat"):
                    meta = tar.extractfile(member).read()  # type: ignore[union-attr]
                elif member.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    truth = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable devkit archive ({exc})") from exc
    if meta is None:
        raise DatasetError(f"{path}: no data/meta.mat inside; is it ILSVRC2012_devkit_t12.tar.gz?")
    cmap = _devkit_from_meta(meta, str(path))
    ground = [int(t) for t in truth.split()] if truth else None
    return ClassMap(cmap.by_name, cmap.source, cmap.devkit_ids, ground)


def read_class_map(path: str | Path) -> ClassMap:
    """Read ``--classes FILE``; formats:

    - the ImageNet devkit: ``ILSVRC2012_devkit_t12.tar.gz`` or its ``data/meta.mat``;
    - JSON: ``{"0": ["n01440764", "tench"], ...}`` (imagenet_class_index.json) or ``{"name": index}``;
    - text, one class per line: ``NAME INDEX`` (an integer second field), or names in index order
      with anything after the first field ignored (``LOC_synset_mapping.txt``:
      ``n01440764 tench, Tinca tinca``). Blank lines and ``#`` comments are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such class file")
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _read_devkit_archive(path)
    if name.endswith(".mat"):
        return _devkit_from_meta(path.read_bytes(), str(path))
    text = path.read_text(encoding="utf-8-sig")
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
        mapping: dict[str, int] = {}
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, list) and v and str(k).isdigit():
                    mapping[str(v[0])] = int(k)
                elif isinstance(v, int):
                    mapping[str(k)] = v
                else:
                    raise DatasetError(f"{path}: expected {{index: [wnid, name]}} or {{name: index}}")
        else:
            raise DatasetError(f"{path}: expected a JSON object")
        return ClassMap(mapping, str(path))
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DatasetError(f"{path}: empty class file")
    if all(len(p) == 2 and _is_int(p[1]) for p in lines):
        return ClassMap({p[0]: int(p[1]) for p in lines}, str(path))
    return ClassMap({p[0]: i for i, p in enumerate(lines)}, f"{path} (line order)")


def _is_int(text: str) -> bool:
    return bool(re.fullmatch(r"[+-]?\d+", text))


def read_labels(path: Path, cmap: ClassMap | None) -> tuple[dict[str, int], dict[int, int]]:
    """``--labels FILE`` for a flat folder -> (by file name or stem, by val image number).

    Formats: ``FILENAME INDEX`` or ``FILENAME WNID`` per line (an index is the model's class
    index; a WordNet id goes through ``--classes``); Kaggle's ``LOC_val_solution.csv``
    (``ImageId,PredictionString``: the first WordNet id counts); the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line for
    ILSVRC2012_val_00000001.JPEG onwards; converted with the devkit's meta.mat, given by
    ``--classes`` or found beside the file), or the devkit archive itself.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such label file")
    if path.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        devkit = _read_devkit_archive(path)
        if not devkit.devkit_ground_truth:
            raise DatasetError(f"{path}: no data/ILSVRC2012_validation_ground_truth.txt inside")
        return {}, {i + 1: devkit.devkit_ids[v] for i, v in enumerate(devkit.devkit_ground_truth)}
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DatasetError(f"{path}: empty label file")

    def to_index(value: str, where: str) -> int:
        if _is_int(value):
            return int(value)
        if cmap is not None and value in cmap.by_name:
            return cmap.by_name[value]
        raise DatasetError(f"{where}: label {value!r} is not a class index"
                           + ("" if cmap else "; pass --classes FILE to map names such as WordNet ids"))

    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        by_name = {}
        for n, ln in enumerate(lines[1:], 2):
            image_id, _, pred = ln.partition(",")
            by_name[image_id] = to_index(pred.split()[0], f"{path}:{n}")
        return by_name, {}
    fields = [ln.split() for ln in lines]
    if all(len(f) == 1 for f in fields):
        if not all(_is_int(f[0]) for f in fields):
            raise DatasetError(f"{path}: one value per line must be the devkit's ILSVRC2012_IDs")
        devkit = cmap if cmap and cmap.devkit_ids else None
        beside = path.parent / "meta.mat"
        if devkit is None and beside.is_file():
            devkit = _devkit_from_meta(beside.read_bytes(), str(beside))
        if devkit is None:
            raise DatasetError(
                f"{path}: one number per line is the devkit's ground truth, whose ILSVRC2012_IDs are not the "
                "models' class indices; pass --classes with the devkit (ILSVRC2012_devkit_t12.tar.gz or "
                "data/meta.mat), or pass the devkit archive as --labels, or write lines 'FILENAME INDEX'")
        try:
            return {}, {i + 1: devkit.devkit_ids[int(f[0])] for i, f in enumerate(fields)}
        except KeyError as exc:
            raise DatasetError(f"{path}: ILSVRC2012_ID {exc} is not a leaf class of the devkit") from exc
    if not all(len(f) >= 2 for f in fields):
        raise DatasetError(f"{path}: expected lines 'FILENAME INDEX'")
    return {f[0]: to_index(f[1], f"{path}:{n}") for n, f in enumerate(fields, 1)}, {}
