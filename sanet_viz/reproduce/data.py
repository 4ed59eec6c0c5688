"""Finding labelled images in a data folder, choosing a balanced subset, and loading them per rank."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..preprocessing import ImageDecodeError, decode_image, prepare, prepare_for
from ..weights import IMAGENET_EVAL, EvalTransform
from .classes import WNID_RE, ClassMap, DatasetError, _is_int, read_class_map, read_labels

__all__ = ["IMAGE_EXTENSIONS", "Sample", "ScannedData", "scan_dataset", "select_balanced",
           "ImageDataset", "ShardSampler", "shard_size", "check_same_crop"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root
    label: int


@dataclass
class ScannedData:
    root: Path
    samples: list[Sample]
    layout: str  # "imagefolder" or "flat"
    class_source: str  # how names became indices
    unlabelled: int = 0  # flat layout: images without a label

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "classes_from": self.class_source,
                "images_found": len(self.samples), "unlabelled_images": self.unlabelled,
                "classes_found": len({s.label for s in self.samples})}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image(f)]
    return found


def scan_dataset(root: str | Path, *, classes_file: str | Path | None = None,
                 labels_file: str | Path | None = None, num_classes: int = 1000) -> ScannedData:
    """Find the labelled images under ``root``.

    ImageFolder layout (one folder per class): folder names are class indices (``0`` .. ``999``),
    or names looked up in ``classes_file``, or WordNet ids when all 1000 ImageNet classes are
    present (index = position in sorted order, torchvision's ImageNet order). Flat layout (the
    ImageNet val folder): images directly under ``root`` and a ``labels_file`` (see
    :func:`read_labels`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such data folder")
    cmap = read_class_map(classes_file) if classes_file else None
    if labels_file is not None:
        return _scan_flat(root, Path(labels_file), cmap, num_classes)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if any(_is_image(p.name) for p in root.iterdir()):
            raise DatasetError(f"{root}: images but no class folders; for a flat folder such as ImageNet "
                               "val pass --labels FILE (lines 'FILENAME INDEX', or the devkit archive)")
        raise DatasetError(f"{root}: no class folders and no images")
    names = [f.name for f in folders]
    mapping, source = _folder_indices(root, names, cmap)
    samples = []
    for folder in folders:
        index = mapping[folder.name]
        if not 0 <= index < num_classes:
            raise DatasetError(f"{folder}: class index {index} is outside 0..{num_classes - 1}")
        samples += [Sample(str(p.relative_to(root)), index) for p in _images_under(folder)]
    if not samples:
        raise DatasetError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ScannedData(root, samples, "imagefolder", source)


def _folder_indices(root: Path, names: list[str], cmap: ClassMap | None) -> tuple[dict[str, int], str]:
    if cmap is not None:
        unknown = [n for n in names if n not in cmap.by_name]
        if unknown:
            raise DatasetError(f"{root}: folder(s) {', '.join(unknown[:5])}"
                               f"{' ...' if len(unknown) > 5 else ''} are not in {cmap.source}")
        return {n: cmap.by_name[n] for n in names}, cmap.source
    if all(_is_int(n) for n in names):
        return {n: int(n) for n in names}, "folder names are class indices"
    if all(WNID_RE.match(n) for n in names):
        if len(names) == 1000:
            return {n: i for i, n in enumerate(sorted(names))}, "1000 WordNet-id folders in sorted order"
        raise DatasetError(
            f"{root}: the folders are WordNet ids but only {len(names)} of the 1000 ImageNet classes "
            "are present, so their indices cannot be derived (sanet_viz ships no WordNet-id list). Pass "
            "--classes FILE: the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz or data/meta.mat), "
            "LOC_synset_mapping.txt (one WordNet id per line in index order), imagenet_class_index.json, "
            "or lines 'FOLDER INDEX'; or name the folders by class index (0..999)")
    odd = [n for n in names if not (_is_int(n) or WNID_RE.match(n))]
    raise DatasetError(f"{root}: folder names such as {', '.join(odd[:3])} are neither class indices nor "
                       "WordNet ids; pass --classes FILE with lines 'FOLDER INDEX'")


def _scan_flat(root: Path, labels_file: Path, cmap: ClassMap | None, num_classes: int) -> ScannedData:
    by_name, by_number = read_labels(labels_file, cmap)
    samples, unlabelled = [], 0
    for p in sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name)):
        label = by_name.get(p.name, by_name.get(p.stem))
        if label is None and by_number:
            m = re.search(r"(\d+)$", p.stem)
            label = by_number.get(int(m.group(1))) if m else None
        if label is None:
            unlabelled += 1
            continue
        if not 0 <= label < num_classes:
            raise DatasetError(f"{labels_file}: label {label} of {p.name} is outside 0..{num_classes - 1}")
        samples.append(Sample(p.name, label))
    if not samples:
        raise DatasetError(f"{root}: no image there has a label in {labels_file}")
    return ScannedData(root, samples, "flat", f"labels from {labels_file}", unlabelled)


def select_balanced(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples taken round-robin over classes (files in sorted order within each).

    ``--limit 1000`` on ImageNet val is one image per class, not 20 classes' worth of images.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    per_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.label, s.path)):
        per_class.setdefault(s.label, []).append(s)
    queues = [per_class[c] for c in sorted(per_class)]
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < limit:
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == limit:
                    break
        depth += 1
    return chosen


def check_same_crop(transforms: Sequence[EvalTransform]) -> list[EvalTransform]:
    """The distinct preprocessings of a run's models (in order), if they crop the same pixels.

    Models may differ in interpolation and normalisation (bicubic for timm's weights): each gets
    its own tensor of the same crop. Different resize or crop sizes raise ValueError.
    """
    distinct = list(dict.fromkeys(transforms))
    first = distinct[0]
    for other in distinct[1:]:
        if not first.same_geometry(other):
            raise ValueError(f"the models were evaluated with different crops ({first.resize_size}->{first.crop_size} "
                             f"vs {other.resize_size}->{other.crop_size}): reproduce feeds every model the same "
                             "crop of each image; run those models in separate reproduce runs (--models)")
    return distinct


class ImageDataset(Dataset):
    """Decoded, preprocessed images; a file that does not decode gives ``ok=False`` and the reason.

    With one ``transform`` an item's tensor is (3, crop, crop). With several (the distinct
    preprocessings of models that crop the same pixels, :func:`check_same_crop`) the picture is
    decoded once and the tensor is (T, 3, crop, crop): the same crop under each transform, in order.
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], *,
                 transform: EvalTransform | Sequence[EvalTransform] = IMAGENET_EVAL) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.transforms = check_same_crop([transform] if isinstance(transform, EvalTransform) else list(transform))
        self.transform = self.transforms[0]
        self.stacked = len(self.transforms) > 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, bool, str]:
        sample = self.samples[index]
        try:
            image = decode_image(self.root / sample.path, name=sample.path)
            if not self.stacked:
                return prepare(image, self.transform).tensor[0], sample.label, index, True, ""
            prepared = prepare_for(image, self.transforms)
            tensor = torch.stack([prepared.tensor_for(t)[0] for t in self.transforms])
            return tensor, sample.label, index, True, ""
        except (ImageDecodeError, OSError) as exc:
            size = self.transform.crop_size
            shape = (len(self.transforms), 3, size, size) if self.stacked else (3, size, size)
            return torch.zeros(shape), sample.label, index, False, str(exc)


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``0..n-1`` (every ``world``-th index), without padding, from ``start``.

    torch's DistributedSampler pads the last round with repeated images so that every rank has
    as many; repeats would count twice. Here shards differ by at most one image.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.indices = list(range(rank, n, world))[start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_size(n: int, rank: int, world: int) -> int:
    return len(range(rank, n, world))

