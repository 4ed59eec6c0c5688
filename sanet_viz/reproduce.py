"""The paper's group analysis at data-set scale: ``python -m sanet_viz reproduce``.

Per model, over a labelled image folder: the unmasked top-1 accuracy; the top-1 accuracy of each
of the 64 masked inputs of the SA_5_3 group probe (official semantics: for image x with label y,
the masks a_k come from layer4.2's output chunks, and group k counts when
argmax(model(x * a_k)) == y); for SA models, the per-class mean SA gate profiles (channel and
spatial, one value per group) at every depth, their class x class correlation per depth and the
mean between-class correlation against depth.

Everything is kept as sums and counts, so the work splits over processes (torchrun: one shard of
the data per rank, no padded duplicates, an all-reduce at the end) and over time (each rank saves
its partial sums atomically under OUT/state every few batches; a rerun continues from there).
The core, :func:`run`, takes a :class:`~sanet_viz.analysis.Lab` and a list of samples, so tests
drive it with tiny models; :func:`cmd_reproduce` is the command line around it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from . import models
from .analysis import AnalysisOptions, Lab, LoadedModel, explain_model, probe_model
from .correlation import ClassCorrelation, correlation_matrix, mean_between_class, nearest_classes, profile_of
from .hooks import FeatureCapture, SAGateRecorder, resolve_module
from .preprocessing import ImageDecodeError, PreparedImage, decode_image, prepare
from .probes import group_maps, masked_scores, probe_masks

__all__ = [
    "Sample", "ClassMap", "DatasetError", "read_class_map", "scan_dataset", "select_balanced",
    "ImageDataset", "ShardSampler", "ReproduceOptions", "ReproduceResult", "ReproduceInterrupted",
    "run", "write_outputs", "init_distributed", "ClassProfiles", "NearestClass", "load_profiles",
    "nearest_classes_for", "add_reproduce_parser", "cmd_reproduce", "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
WNID_RE = re.compile(r"^n\d{8}$")
STATE_VERSION = 1


class DatasetError(ValueError):
    """A data folder, class file or label file that cannot be used; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Class names -> ImageNet indices.

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


# ---------------------------------------------------------------------------------------------
# Scanning a data folder.

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


# ---------------------------------------------------------------------------------------------
# Loading.

class ImageDataset(Dataset):
    """Decoded, preprocessed images; a file that does not decode gives ``ok=False`` and the reason."""

    def __init__(self, root: str | Path, samples: Sequence[Sample], *, crop_size: int = 224) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, bool, str]:
        sample = self.samples[index]
        try:
            tensor = prepare(decode_image(self.root / sample.path, name=sample.path)).tensor[0]
            return tensor, sample.label, index, True, ""
        except (ImageDecodeError, OSError) as exc:
            return torch.zeros(3, self.crop_size, self.crop_size), sample.label, index, False, str(exc)


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


# ---------------------------------------------------------------------------------------------
# The engine.

@dataclass
class ReproduceOptions:
    batch_size: int = 8  # images per loader batch (unmasked forward)
    probe_batch_size: int = 32  # masked inputs per forward
    precision: str = "fp32"  # of the masked forwards ("auto": see decide_precisions); unmasked is fp32
    model_precision: dict[str, str] | None = None  # per model, resolved by run(); wins over precision
    workers: int = 0
    probe: bool = True
    checkpoint_every: int = 20  # batches between saved states (per rank)
    fresh: bool = False  # ignore a saved state
    progress: bool = True
    stop_after_batches: int | None = None  # testing hook: save and stop as if interrupted
    max_error_examples: int = 20

    def precision_for(self, key: str) -> str:
        return (self.model_precision or {}).get(key, self.precision)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.probe_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be at least 1")


class ReproduceInterrupted(RuntimeError):
    """Stopped before the end; the partial sums are saved and a rerun continues."""


def _num_classes(lm: LoadedModel) -> int:
    fc = getattr(lm.model, "fc", None)
    return int(fc.out_features) if fc is not None else len(lm.categories)


def _sa_groups(lm: LoadedModel) -> int:
    first = next(iter(lm.sa_modules.values()))
    return int(resolve_module(lm.model, first).groups)


def _zero_sums(lab: Lab, num_classes: int, probe: bool, device: torch.device) -> dict[str, Tensor]:
    i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
    sums = {"images": torch.zeros((), **i64), "decode_errors": torch.zeros((), **i64),
            "class_images": torch.zeros(num_classes, **i64)}
    for key, lm in lab.models.items():
        sums[f"{key}.correct"] = torch.zeros((), **i64)
        sums[f"{key}.class_correct"] = torch.zeros(num_classes, **i64)
        sums[f"{key}.unmasked_score"] = torch.zeros((), **f64)
        if probe:
            sums[f"{key}.group_correct"] = torch.zeros(lm.probe_groups, **i64)
            sums[f"{key}.group_score"] = torch.zeros(lm.probe_groups, **f64)
        if lm.has_sa:
            shape = (len(lm.sa_modules), num_classes, _sa_groups(lm))
            sums[f"{key}.gate_channel"] = torch.zeros(shape, **f64)
            sums[f"{key}.gate_spatial"] = torch.zeros(shape, **f64)
    return sums


@dataclass
class _ModelBatch:
    correct: Tensor  # (B,) bool
    unmasked_score: Tensor  # (B,) softmax of the predicted class
    group_correct: Tensor | None  # (B, G) bool
    group_score: Tensor | None  # (B, G)
    channel: Tensor | None  # (D, B, Gsa)
    spatial: Tensor | None


@torch.no_grad()
def evaluate_batch(lm: LoadedModel, x: Tensor, y: Tensor, options: ReproduceOptions) -> _ModelBatch:
    """One model on one batch: the unmasked forward (fp32, hooked) and the group probe."""
    with lm.lock, FeatureCapture(lm.model, [lm.probe_layer]) as capture, \
            SAGateRecorder(lm.model, lm.sa_modules) as gates:
        logits = lm.model(x).float()
    predicted = logits.argmax(-1)
    unmasked = torch.softmax(logits, -1).gather(1, predicted[:, None]).squeeze(1)
    group_correct = group_score = None
    if options.probe:
        maps = group_maps(capture.outputs[lm.probe_layer], lm.probe_groups)
        per_chunk = max(1, math.ceil(options.probe_batch_size / lm.probe_groups))
        scores, preds = [], []
        with lm.lock:
            for chunk in torch.arange(len(x), device=x.device).split(per_chunk):
                masks = probe_masks(maps[chunk], tuple(x.shape[-2:]))
                precision = options.precision_for(lm.key)
                s, p = masked_scores(lm.probe_model_for(precision), x[chunk], masks, predicted[chunk],
                                     batch_size=options.probe_batch_size, precision=precision,
                                     channels_last=lm.fast_model is not None)
                scores.append(s)
                preds.append(p)
        group_score = torch.cat(scores)
        group_correct = torch.cat(preds) == y[:, None]
    channel = spatial = None
    if lm.has_sa:
        channel = torch.stack([gates.channel[d] for d in lm.sa_modules]).double()
        spatial = torch.stack([gates.spatial[d] for d in lm.sa_modules]).double()
    return _ModelBatch(predicted == y, unmasked, group_correct, group_score, channel, spatial)


def decide_precisions(lab: Lab, root: str | Path, samples: Sequence[Sample],
                      options: ReproduceOptions) -> dict[str, str]:
    """Per model, the masked forwards' precision: an explicit fp32/bf16 as asked; ``auto`` as the
    analysis does it (bf16 where native and where bf16 matches fp32 by the issue's rule on the
    data set's first decodable image, else fp32). Every rank decides on the same image.
    """
    wanted = {key: lm.probe_precision(options.precision) for key, lm in lab.models.items()}
    if "check" in wanted.values() and options.probe:
        dataset = ImageDataset(root, samples)
        first = next((item for item in (dataset[i] for i in range(min(len(dataset), 50))) if item[3]), None)
        if first is not None:
            image = PreparedImage(first[0][None], np.zeros((1, 1, 3), np.uint8), tuple(first[0].shape[-2:]))
            name = samples[first[2]].path
            for key, lm in lab.models.items():
                if wanted[key] == "check":
                    with lm.lock:
                        explained = explain_model(lm, image, AnalysisOptions(precision="auto", gates=False))
                        probe_model(lm, image, explained, AnalysisOptions(precision="auto"), name=name)
                        wanted[key] = lm.probe_precision("auto")
    return {key: value.replace("check", "fp32") for key, value in wanted.items()}


def _commit(sums: dict[str, Tensor], y: Tensor, outs: Mapping[str, _ModelBatch]) -> None:
    sums["images"] += len(y)
    sums["class_images"].index_add_(0, y, torch.ones_like(y))
    for key, o in outs.items():
        sums[f"{key}.correct"] += o.correct.sum()
        sums[f"{key}.class_correct"].index_add_(0, y, o.correct.long())
        sums[f"{key}.unmasked_score"] += o.unmasked_score.double().sum()
        if o.group_correct is not None and o.group_score is not None:
            sums[f"{key}.group_correct"] += o.group_correct.long().sum(0)
            sums[f"{key}.group_score"] += o.group_score.double().sum(0)
        if o.channel is not None and o.spatial is not None:
            sums[f"{key}.gate_channel"].index_add_(1, y, o.channel)
            sums[f"{key}.gate_spatial"].index_add_(1, y, o.spatial)


def _fingerprint(lab: Lab, samples: Sequence[Sample], options: ReproduceOptions, world: int,
                 num_classes: int) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\0{s.label}\n".encode())
    meta = {"version": STATE_VERSION, "world": world, "precision": options.precision, "probe": options.probe,
            "num_classes": num_classes,
            "models": {k: [lm.weights.source, lm.weights.sha256, lm.probe_layer, lm.probe_groups,
                           list(lm.sa_modules)] for k, lm in lab.models.items()}}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _state_path(state_dir: Path, rank: int, world: int) -> Path:
    return state_dir / f"rank{rank:04d}-of-{world:04d}.pt"


def _save_state(path: Path, fingerprint: str, done: int, sums: Mapping[str, Tensor], errors: list[str],
                seconds: float) -> None:
    """Atomically: write a temporary file beside the target, then rename it over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"version": STATE_VERSION, "fingerprint": fingerprint, "done": done, "seconds": seconds,
                "sums": {k: v.detach().cpu() for k, v in sums.items()}, "errors": errors}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say which, never guess
        raise ReproduceStateError(f"{path}: unreadable saved state ({exc}); rerun with --fresh") from exc


class ReproduceStateError(ValueError):
    """A saved state that does not belong to this run."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_agree(ok: bool, device: torch.device) -> bool:
    """True on every rank when ``ok`` on every rank (so that no rank waits alone in a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


@dataclass
class ReproduceResult:
    """The data-set figures: sums and counts of every rank, and how the run went."""

    sums: dict[str, np.ndarray]
    models: dict[str, dict[str, Any]]  # key -> display_name, weights, pretrained, probe layer, depths
    categories: list[str]
    decode_error_examples: list[str]
    device: dict[str, Any]
    precision: str
    world_size: int
    seconds: float  # wall time of this session's loop (slowest rank)
    seconds_total: float  # including earlier sessions whose sums were resumed (slowest rank)
    images_this_session: int  # all ranks
    images_resumed: int  # taken from saved states

    @property
    def images(self) -> int:
        return int(self.sums["images"])

    @property
    def decode_errors(self) -> int:
        return int(self.sums["decode_errors"])

    @property
    def images_per_s(self) -> float | None:
        return self.images_this_session / self.seconds if self.seconds > 0 and self.images_this_session else None

    @property
    def images_per_s_overall(self) -> float | None:
        """All images (and undecodable files) over all sessions' loop time."""
        n = self.images + self.decode_errors
        return n / self.seconds_total if self.seconds_total > 0 and n else None

    def top1(self, key: str) -> float:
        return int(self.sums[f"{key}.correct"]) / self.images if self.images else float("nan")

    def group_top1(self, key: str) -> np.ndarray | None:
        c = self.sums.get(f"{key}.group_correct")
        return None if c is None else c / max(self.images, 1)

    def present_classes(self) -> np.ndarray:
        return np.flatnonzero(self.sums["class_images"] > 0)

    def class_profiles(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classes (K,), channel means (D, K, G), spatial means (D, K, G)) over classes with images."""
        classes = self.present_classes()
        counts = self.sums["class_images"][classes].astype(np.float64)
        channel = self.sums[f"{key}.gate_channel"][:, classes] / counts[None, :, None]
        spatial = self.sums[f"{key}.gate_spatial"][:, classes] / counts[None, :, None]
        return classes, channel, spatial

    def class_correlation(self, key: str) -> ClassCorrelation:
        """Per depth: Pearson correlation of the classes' mean [channel, spatial] profiles."""
        classes, channel, spatial = self.class_profiles(key)
        depths = self.models[key]["sa_depths"]
        matrices, between = {}, {}
        for d, depth in enumerate(depths):
            matrices[depth] = correlation_matrix(np.concatenate([channel[d], spatial[d]], axis=1))
            between[depth] = mean_between_class(matrices[depth])
        return ClassCorrelation(list(depths), [int(c) for c in classes], matrices, between)

    def label(self, index: int) -> str:
        return self.categories[index] if 0 <= index < len(self.categories) else str(index)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.images, "decode_errors": self.decode_errors,
            "decode_error_examples": self.decode_error_examples,
            "classes": int(len(self.present_classes())),
            "device": self.device, "world_size": self.world_size, "probe_precision": self.precision,
            "throughput": {"images_per_s": self.images_per_s, "seconds": round(self.seconds, 3),
                           "images_per_s_all_sessions": self.images_per_s_overall,
                           "seconds_all_sessions": round(self.seconds_total, 3),
                           "images_this_session": self.images_this_session,
                           "images_resumed": self.images_resumed},
            "pretrained": all(m["pretrained"] for m in self.models.values()),
            "models": {},
        }
        for key, m in self.models.items():
            entry: dict[str, Any] = {
                "display_name": m["display_name"], "pretrained": m["pretrained"], "weights": m["weights"],
                "top1": self.top1(key), "correct": int(self.sums[f"{key}.correct"]),
                "mean_unmasked_score": float(self.sums[f"{key}.unmasked_score"]) / max(self.images, 1),
                "probe_precision": m.get("probe_precision", self.precision), "bf16_check": m.get("bf16_check"),
            }
            group = self.group_top1(key)
            if group is not None:
                score = self.sums[f"{key}.group_score"] / max(self.images, 1)
                entry["group_probe"] = {
                    "layer": m["probe_layer"], "paper_name": m["probe_paper_name"], "groups": len(group),
                    "semantics": "share of images whose argmax(model(x * a_k)) equals the label",
                    "top1_per_group": group.tolist(),
                    "correct_per_group": self.sums[f"{key}.group_correct"].astype(int).tolist(),
                    "mean_top1_over_groups": float(group.mean()),
                    "best_group": int(group.argmax()), "worst_group": int(group.argmin()),
                    "mean_score_per_group": score.tolist(),
                }
            if m["sa_depths"]:
                if len(self.present_classes()) >= 2:
                    corr = self.class_correlation(key)
                    entry["mean_between_class_correlation"] = corr.mean_between
                else:
                    entry["mean_between_class_correlation"] = None
                entry["sa_depths"] = m["sa_depths"]
                # How much the class profiles vary at all: gates of untrained SA layers (weight 0,
                # bias 1) are constant, and correlations of rounding noise mean nothing.
                _, channel, spatial = self.class_profiles(key)
                spread = {d: float(np.concatenate([channel[i], spatial[i]], axis=1).std())
                          for i, d in enumerate(m["sa_depths"])}
                entry["profile_std_per_depth"] = spread
                flat = [d for d, v in spread.items() if v < 1e-6]
                if flat:
                    entry["note"] = (f"SA gates are constant at {', '.join(flat)} (untrained SA layers?): the "
                                     "class correlations there measure rounding noise only")
            out["models"][key] = entry
        untrained = [m["display_name"] for m in self.models.values() if not m["pretrained"]]
        out["warning"] = (f"{' and '.join(untrained)} ran with UNTRAINED weights: these numbers are not "
                          "those of the published models" if untrained else None)
        return out


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["name"] = name
        info["threads"] = torch.get_num_threads()
        info["cpus"] = os.cpu_count()
    return info


def run(lab: Lab, root: str | Path, samples: Sequence[Sample], options: ReproduceOptions, *,
        state_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> ReproduceResult:
    """Evaluate every model of ``lab`` on ``samples`` (paths relative to ``root``).

    Under torch.distributed (initialised by the caller), each rank takes every world-th sample and
    the sums are all-reduced at the end, so every rank returns the same result. With
    ``state_dir``, partial sums are saved there (per rank) every ``checkpoint_every`` batches and
    on Ctrl-C/SIGTERM, and a later call with the same data, models and world size continues.
    """
    rank, world = _rank_world()
    device = lab.device
    say = log if (log and rank == 0) else (lambda _m: None)
    num_classes = {_num_classes(lm) for lm in lab.models.values()}
    if len(num_classes) != 1:
        raise ValueError(f"the models predict different numbers of classes: {sorted(num_classes)}")
    k_classes = num_classes.pop()
    bad = [s for s in samples if not 0 <= s.label < k_classes]
    if bad:
        raise DatasetError(f"{bad[0].path}: label {bad[0].label} is outside the models' 0..{k_classes - 1}")
    model_precision = decide_precisions(lab, root, samples, options)
    distinct = set(model_precision.values())
    precision = distinct.pop() if len(distinct) == 1 else ", ".join(f"{k} {v}" for k, v in model_precision.items())
    options = ReproduceOptions(**{**options.__dict__, "precision": precision, "model_precision": model_precision})
    fingerprint = _fingerprint(lab, samples, options, world, k_classes)

    sums = _zero_sums(lab, k_classes, options.probe, device)
    errors: list[str] = []
    done = 0
    earlier = 0.0  # loop seconds of earlier sessions (this rank)
    state_path = _state_path(Path(state_dir), rank, world) if state_dir is not None else None
    problem = ""
    if state_path is not None:
        if options.fresh and state_path.exists():
            state_path.unlink()
        elif state_path.exists():
            try:
                state = _load_state(state_path)
                if state.get("fingerprint") != fingerprint or set(state["sums"]) != set(sums):
                    problem = (f"{state_path}: the saved state is from another run (data, --limit, models, "
                               "precision or number of processes differ); rerun with --fresh or another --out")
                else:
                    done = int(state["done"])
                    earlier = float(state.get("seconds", 0.0))
                    errors = list(state["errors"])
                    sums = {k: state["sums"][k].to(device) for k in sums}
            except ReproduceStateError as exc:
                problem = str(exc)
        if rank == 0 and not options.fresh and Path(state_dir).is_dir():
            others = [p.name for p in Path(state_dir).glob("rank*-of-*.pt")
                      if not p.name.endswith(f"-of-{world:04d}.pt")]
            if others:
                say(f"note: ignoring saved states of a run with another number of processes: {others[0]} ...")
    all_fingerprints = [fingerprint]
    if world > 1:
        all_fingerprints = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(all_fingerprints, fingerprint)
    if len(set(all_fingerprints)) > 1 and not problem:
        problem = ("the ranks see different data or models (every rank needs the same folder contents, "
                   "--limit, weights and precision)")
    if not _all_agree(not problem, device):
        raise ReproduceStateError(problem or "another rank could not use its saved state (see its error)")

    resumed = torch.tensor(int(sums["images"] + sums["decode_errors"]), device=device)
    my_total = shard_size(len(samples), rank, world)
    if done:
        say(f"resuming: {done} of this rank's {my_total} images were done before")
    dataset = ImageDataset(root, samples)
    loader = DataLoader(dataset, batch_size=options.batch_size,
                        sampler=ShardSampler(len(samples), rank, world, done),
                        num_workers=options.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if options.workers else None,
                        persistent_workers=False)
    bar = None
    if rank == 0 and options.progress:
        from tqdm import tqdm

        bar = tqdm(total=my_total, initial=done, unit="img", file=sys.stderr, dynamic_ncols=True,
                   desc=f"reproduce (rank 0 of {world})" if world > 1 else "reproduce", smoothing=0.1)
    session = 0
    batches = 0
    committing = False
    start = time.perf_counter()
    try:
        for x, y, _index, ok, messages in loader:
            n_bad = int((~ok).sum())
            if n_bad:
                for msg in (m for m, good in zip(messages, ok.tolist()) if not good):
                    if bar is not None:
                        bar.write(f"skipped: {msg}", file=sys.stderr)
                    if len(errors) < options.max_error_examples:
                        errors.append(msg)
            if n_bad:
                x, y = x[ok], y[ok]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            outs = {key: evaluate_batch(lm, x, y, options) for key, lm in lab.models.items()} if len(y) else {}
            committing = True
            if len(y):
                _commit(sums, y, outs)
            sums["decode_errors"] += n_bad
            done += len(ok)
            committing = False
            session += len(ok)
            batches += 1
            if bar is not None:
                bar.update(len(ok))
                seen = int(sums["images"])
                if seen:
                    bar.set_postfix({lm.display_name: f"{int(sums[f'{k}.correct']) / seen:.1%}"
                                     for k, lm in lab.models.items()}, refresh=False)
            if state_path is not None and batches % options.checkpoint_every == 0:
                _save_state(state_path, fingerprint, done, sums, errors, earlier + time.perf_counter() - start)
            if options.stop_after_batches is not None and batches >= options.stop_after_batches:
                if state_path is not None:
                    _save_state(state_path, fingerprint, done, sums, errors, earlier + time.perf_counter() - start)
                raise ReproduceInterrupted(f"stopped after {batches} batches ({done} of {my_total} images); "
                                           "run again to continue")
    except KeyboardInterrupt:
        if state_path is not None and not committing:
            _save_state(state_path, fingerprint, done, sums, errors, earlier + time.perf_counter() - start)
            say(f"\ninterrupted: partial sums saved in {state_path.parent}; run the same command to continue")
        raise
    finally:
        if bar is not None:
            bar.close()
    if state_path is not None:
        _save_state(state_path, fingerprint, done, sums, errors, earlier + time.perf_counter() - start)
    seconds = time.perf_counter() - start
    seconds_total = earlier + seconds
    session_t = torch.tensor(session, device=device)
    if world > 1:
        for key in sorted(sums):
            dist.all_reduce(sums[key])
        dist.all_reduce(session_t)
        dist.all_reduce(resumed)
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, errors)
        errors = [e for part in gathered for e in part][: options.max_error_examples]
        seconds_t = torch.tensor([seconds, seconds_total], dtype=torch.float64, device=device)
        dist.all_reduce(seconds_t, op=dist.ReduceOp.MAX)
        seconds, seconds_total = (float(v) for v in seconds_t)
    model_info = {key: {"display_name": lm.display_name, "pretrained": lm.weights.pretrained,
                        "weights": lm.weights.to_dict(), "weights_note": lm.weights.note,
                        "probe_layer": lm.probe_layer, "probe_paper_name": _paper_name(lm.probe_layer),
                        "sa_depths": list(lm.sa_modules), "probe_precision": options.precision_for(key),
                        "bf16_check": lm.bf16_check.to_dict() if lm.bf16_check else None}
                  for key, lm in lab.models.items()}
    first = next(iter(lab.models.values()))
    return ReproduceResult({k: v.cpu().numpy() for k, v in sums.items()}, model_info, list(first.categories),
                           errors, {**_device_info(device), "processes": world}, precision, world, seconds,
                           seconds_total, int(session_t), int(resumed))


def _paper_name(module: str) -> str | None:
    try:
        return models.module_to_paper_name(module)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Outputs: CSV, JSON, figures, profiles.

def write_outputs(result: ReproduceResult, out: str | Path, *, figure_classes: Sequence[int] | None = None,
                  data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """summary.json, accuracy.csv, group_accuracy.csv, per_class.csv, correlation_vs_depth.csv,
    profiles.npz (SA models) and the figures; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = result.summary()
    if data is not None:
        summary["data"] = dict(data)

    def emit(name: str, rows: list[list[Any]]) -> None:
        path = out / name
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        written[name] = path

    keys = list(result.models)
    emit("accuracy.csv", [["model", "display_name", "pretrained", "images", "correct", "top1",
                           "mean_group_top1", "probe_layer"]] + [
        [k, m["display_name"], m["pretrained"], result.images, int(result.sums[f"{k}.correct"]),
         _fmt(result.top1(k)), _fmt(float(g.mean())) if (g := result.group_top1(k)) is not None else "",
         m["probe_layer"]] for k, m in result.models.items()])
    probed = [k for k in keys if result.group_top1(k) is not None]
    if probed:
        groups = len(result.group_top1(probed[0]))  # type: ignore[arg-type]
        header = ["group"] + [f"{k}_{c}" for k in probed for c in ("top1", "correct", "mean_score")]
        rows = [header]
        for g in range(groups):
            row: list[Any] = [g]
            for k in probed:
                top = result.group_top1(k)
                row += [_fmt(float(top[g])) if g < len(top) else "",  # type: ignore[index,arg-type]
                        int(result.sums[f"{k}.group_correct"][g]) if g < len(top) else "",  # type: ignore[arg-type]
                        _fmt(float(result.sums[f"{k}.group_score"][g]) / max(result.images, 1))
                        if g < len(top) else ""]  # type: ignore[arg-type]
            rows.append(row)
        rows.append(["unmasked"] + [v for k in probed for v in (_fmt(result.top1(k)),
                                                                int(result.sums[f"{k}.correct"]), "")])
        emit("group_accuracy.csv", rows)
    classes = result.present_classes()
    emit("per_class.csv", [["class", "label", "images"] + [f"{k}_top1" for k in keys]] + [
        [int(c), result.label(int(c)), int(result.sums["class_images"][c])]
        + [_fmt(int(result.sums[f"{k}.class_correct"][c]) / int(result.sums["class_images"][c])) for k in keys]
        for c in classes])
    sa_keys = [k for k in keys if result.models[k]["sa_depths"]]
    correlations = {k: result.class_correlation(k) for k in sa_keys if len(classes) >= 2}
    if correlations:
        rows = [["model", "depth", "module", "mean_between_class_correlation", "classes"]]
        for k, corr in correlations.items():
            rows += [[k, d, models.paper_name_to_module(d) + ".sa", _fmt(corr.mean_between[d]),
                      len(corr.classes)] for d in corr.depths]
        emit("correlation_vs_depth.csv", rows)
    for k in sa_keys:
        name = "profiles.npz" if k == "sanet50" or len(sa_keys) == 1 else f"profiles_{k}.npz"
        written[name] = save_profiles(result, k, out / name)
    written.update(_write_figures(result, out, correlations, figure_classes))
    summary["files"] = sorted(set(written) | {"summary.json"})
    path = out / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    written["summary.json"] = path
    return written


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.6f}"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_figures(result: ReproduceResult, out: Path, correlations: Mapping[str, ClassCorrelation],
                   figure_classes: Sequence[int] | None) -> dict[str, Path]:
    from . import charts

    written = {}
    if any(result.group_top1(k) is not None for k in result.models):
        fig = group_accuracy_figure(result)
        charts.save(fig, str(out / "group_accuracy.png"))
        written["group_accuracy.png"] = out / "group_accuracy.png"
    for k, corr in correlations.items():
        m = result.models[k]
        suffix = "" if k == "sanet50" or len(correlations) == 1 else f"_{k}"
        tag = "" if m["pretrained"] else " (UNTRAINED)"
        fig = charts.correlation_vs_depth(corr, label=f"{m['display_name']}{tag}, {result.images} images")
        charts.save(fig, str(out / f"correlation_vs_depth{suffix}.png"))
        written[f"correlation_vs_depth{suffix}.png"] = out / f"correlation_vs_depth{suffix}.png"
        chosen = _choose_classes(corr.classes, figure_classes)
        rows = [corr.classes.index(c) for c in chosen]
        sub = ClassCorrelation(corr.depths, chosen, {d: mat[np.ix_(rows, rows)] for d, mat in corr.matrices.items()},
                               corr.mean_between)
        fig = charts.correlation_matrices(sub, class_names=[f"{c} {result.label(c)}" for c in chosen])
        fig.suptitle(f"{m['display_name']}{tag}: class x class correlation of mean SA profiles "
                     f"({len(chosen)} of {len(corr.classes)} classes shown; r in titles: all classes)",
                     fontsize=9)
        charts.save(fig, str(out / f"correlation_matrices{suffix}.png"))
        written[f"correlation_matrices{suffix}.png"] = out / f"correlation_matrices{suffix}.png"
    return written


def _choose_classes(present: list[int], wanted: Sequence[int] | None, most: int = 12) -> list[int]:
    if wanted:
        missing = [c for c in wanted if c not in present]
        if missing:
            _warn(f"--figure-classes: {missing} have no images in this run; left out of the figure")
        chosen = [c for c in dict.fromkeys(wanted) if c in present]
        if len(chosen) >= 1:
            return chosen
    if len(present) <= most:
        return list(present)
    return [present[int(i)] for i in np.linspace(0, len(present) - 1, most).round()]


def group_accuracy_figure(result: ReproduceResult) -> Any:
    """Group k vs top-1 of x * a_k, one panel per model, the unmasked top-1 as a dashed line."""
    from . import charts

    plt = charts.plt
    keys = [k for k in result.models if result.group_top1(k) is not None]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 2.8 * len(keys)), squeeze=False, sharex=True, sharey=True)
    top = max([result.top1(k) for k in keys]
              + [float(result.group_top1(k).max()) for k in keys])  # type: ignore[union-attr]
    for ax, key in zip(axes[:, 0], keys):
        m = result.models[key]
        acc = result.group_top1(key) * 100  # type: ignore[operator]
        idx = np.arange(len(acc))
        if m["sa_depths"]:  # SA_5_3's output: even chunks hold channel-branch halves, odd spatial
            colours = [charts.BRANCH_COLOURS["channel" if i % 2 == 0 else "spatial"] for i in idx]
        else:
            colours = [charts.RESNET_COLOUR] * len(acc)
        ax.bar(idx, acc, color=colours, width=0.8)
        ax.axhline(result.top1(key) * 100, color="black", lw=1.2, ls="--",
                   label=f"unmasked top-1 {result.top1(key):.2%}")
        handles, labels = ax.get_legend_handles_labels()
        if m["sa_depths"]:
            handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in charts.BRANCH_COLOURS.values()] + handles
            labels = ["channel-branch chunk (even k)", "spatial-branch chunk (odd k)"] + labels
        ax.legend(handles, labels, fontsize=7, loc="upper right", ncol=3)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, max(1.0, top * 100 * 1.15))
        name = m["probe_paper_name"] or m["probe_layer"]
        warn = "" if m["pretrained"] else f"\n{charts.UNTRAINED_NOTE}"
        ax.set_title(f"{m['display_name']}: top-1 of x * a_k, group k of {name} ({m['probe_layer']}), "
                     f"{result.images} images; mean over groups {float(acc.mean()):.2f}%{warn}",
                     fontsize=9, color="black" if m["pretrained"] else "#b00020")
    axes[-1, 0].set_xlabel("group k (k-th chunk of consecutive channels of the block output)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Profiles for the app.

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

    def reference(self, depth: str) -> np.ndarray:
        """(K, 2G): each class's [channel, spatial] profile at ``depth`` (as correlation.profile_of)."""
        d = self.depths.index(depth)
        return np.concatenate([self.channel[d], self.spatial[d]], axis=1).astype(np.float64)


class NearestClass(NamedTuple):
    index: int  # ImageNet class index
    label: str
    r: float  # Pearson correlation of the image's profile with the class's mean profile


def save_profiles(result: ReproduceResult, key: str, path: str | Path) -> Path:
    classes, channel, spatial = result.class_profiles(key)
    m = result.models[key]
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(
        tmp, classes=classes.astype(np.int64), labels=np.array([result.label(int(c)) for c in classes], dtype=str),
        counts=result.sums["class_images"][classes].astype(np.int64), depths=np.array(m["sa_depths"], dtype=str),
        channel=channel.astype(np.float32), spatial=spatial.astype(np.float32), model=np.array(key),
        pretrained=np.array(bool(m["pretrained"])), weights_source=np.array(str(m["weights"]["source"])),
        images=np.array(result.images, dtype=np.int64), format=np.array("sanet-viz profiles 1"))
    os.replace(tmp, path)
    return path


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


# ---------------------------------------------------------------------------------------------
# Command line.

def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); returns
    (rank, world size, device for this rank). nccl on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in {"auto", "cuda"} and torch.cuda.is_available() or device.startswith("cuda")
    if use_cuda and device in {"auto", "cuda"}:
        device = f"cuda:{local}"
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def add_reproduce_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .cli import COMPILE_HELP, _add_model_args

    p = subparsers.add_parser(
        "reproduce", help="the paper's group analysis over a labelled image folder (1 GPU or torchrun)",
        description="Per model: top-1 accuracy, per-group top-1 of the SA_5_3 probe; for SANet50 per-class "
                    "SA gate profiles and their class correlation at every depth. Launch with torchrun for "
                    "several GPUs or machines. Rerunning the same command continues an interrupted run.")
    p.add_argument("--data", type=Path, required=True,
                   help="ImageFolder (one folder per class: class indices, or WordNet ids with --classes or "
                        "all 1000 present), or a flat folder with --labels")
    p.add_argument("--out", type=Path, required=True, help="output folder (state/ inside keeps partial sums)")
    p.add_argument("--classes", metavar="FILE", help="folder/label name -> class index: the ImageNet devkit "
                   "archive or meta.mat, LOC_synset_mapping.txt, imagenet_class_index.json, or 'NAME INDEX' lines")
    p.add_argument("--labels", metavar="FILE", help="labels of a flat folder: 'FILENAME INDEX' lines, the "
                   "devkit's ground truth (with the devkit) or the devkit archive, LOC_val_solution.csv")
    p.add_argument("--limit", type=int, help="use N images, taken round-robin over classes")
    p.add_argument("--batch-size", type=int, help="images per batch (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--probe-batch-size", type=int,
                   help="masked inputs per forward (default 256 on a GPU, 32 on the CPU)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default 4 on a GPU, 1 on the CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="of the 64 masked forwards; auto: per model, bf16 where the hardware runs it natively "
                        "and a check on the first image shows bf16 within 0.02 of fp32 with the group ranking "
                        "kept, else fp32. The unmasked forward (top-1, gates) is always fp32")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--models", default="resnet50,sanet50", help="comma-separated subset of resnet50,sanet50")
    p.add_argument("--no-probe", action="store_true", help="skip the group probe (top-1 and SA profiles only)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between saved partial sums")
    p.add_argument("--fresh", action="store_true", help="discard saved partial sums and start over")
    p.add_argument("--figure-classes", help="comma-separated class indices for the correlation-matrix figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_args(p)
    return p


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``python -m sanet_viz reproduce``; exit 0 when done, 3 when some images failed to decode."""
    rank, world, device_name = init_distributed(args.device)
    log = (lambda m: print(m, file=sys.stderr)) if rank == 0 else None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:  # torchrun and schedulers stop workers with SIGTERM
        raise KeyboardInterrupt

    if threading_main():
        signal.signal(signal.SIGTERM, on_term)
    try:
        wanted = [k.strip() for k in args.models.split(",") if k.strip()]
        unknown = set(wanted) - {"resnet50", "sanet50"}
        if unknown or not wanted:
            raise ValueError(f"--models: choose from resnet50,sanet50 (got {args.models!r})")
        figure_classes = [int(c) for c in args.figure_classes.split(",")] if args.figure_classes else None
        scanned = scan_dataset(args.data, classes_file=args.classes, labels_file=args.labels)
        samples = select_balanced(scanned.samples, args.limit)
        lab = Lab.load(resnet50=args.resnet50, sanet50=args.sanet50, device=device_name,
                       weights_dir=args.weights_dir, require_pretrained=args.require_pretrained,
                       compile_probe=args.compile, log=log)
        lab = Lab({k: lab.models[k] for k in wanted})
        device = lab.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            for lm in lab.models.values():
                lm.model.to(memory_format=torch.channels_last)
                if lm.fast_model is not None:
                    lm.fast_model.to(memory_format=torch.channels_last)
        untrained = [lm for lm in lab.models.values() if not lm.weights.pretrained]
        if rank == 0:
            for lm in untrained:
                _warn(f"{lm.display_name} runs UNTRAINED: {lm.weights.note}. Its numbers are not those of the "
                      "published model.")
            print(f"data: {len(samples)} of {len(scanned.samples)} images, "
                  f"{len({s.label for s in samples})} classes ({scanned.class_source})"
                  + (f"; {scanned.unlabelled} images without a label skipped" if scanned.unlabelled else ""),
                  file=sys.stderr)
        gpu = device.type == "cuda"
        options = ReproduceOptions(
            batch_size=args.batch_size or (64 if gpu else 8),
            probe_batch_size=args.probe_batch_size or (256 if gpu else 32),
            precision=args.precision, workers=args.workers if args.workers is not None else (4 if gpu else 1),
            probe=not args.no_probe, checkpoint_every=args.checkpoint_every, fresh=args.fresh,
            progress=not args.no_progress)
        result = run(lab, scanned.root, samples, options, state_dir=args.out / "state", log=log)
        if rank == 0:
            data = {**scanned.describe(), "limit": args.limit, "images_selected": len(samples)}
            write_outputs(result, args.out, figure_classes=figure_classes, data=data)
            _report(result, args.out)
            if untrained:
                _warn(f"results come from UNTRAINED {' and '.join(lm.display_name for lm in untrained)}: "
                      "summary.json says \"pretrained\": false (see README, 'Weights')")
        return 3 if result.decode_errors else 0
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _report(result: ReproduceResult, out: Path) -> None:
    lines = [f"{result.images} images ({result.decode_errors} could not be decoded), "
             f"{len(result.present_classes())} classes"]
    for key, m in result.models.items():
        text = f"  {m['display_name']}: top-1 {result.top1(key):.2%}"
        group = result.group_top1(key)
        if group is not None:
            text += (f"; {m['probe_paper_name'] or m['probe_layer']} group top-1 mean {group.mean():.2%}, "
                     f"best k={int(group.argmax())} {group.max():.2%}, worst k={int(group.argmin())} {group.min():.2%}")
        if not m["pretrained"]:
            text += " [UNTRAINED]"
        lines.append(text)
    rate, overall = result.images_per_s, result.images_per_s_overall
    dev = result.device
    probed = any(result.group_top1(k) is not None for k in result.models)
    text = f"throughput: {rate:.2f} images/s" if rate else "throughput: nothing left to compute"
    text += (f" over {result.world_size} process(es) on {dev['device']} ({dev.get('name', '')}), "
             + (f"masked forwards in {result.precision}" if probed else "no probe")
             + f"; {result.seconds:.1f} s this session")
    if result.images_resumed:
        text += f"; {result.images_resumed} images from saved state"
        if overall:
            text += f", {overall:.2f} images/s over all sessions"
    lines.append(text)
    lines.append(f"wrote {out}/summary.json and the CSV, figures and profiles beside it")
    print("\n".join(lines), file=sys.stderr)
