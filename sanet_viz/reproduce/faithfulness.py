"""Faithfulness over a data set (``reproduce --faithfulness``).

For every image and model: the CAM of the predicted class (Grad-CAM at the probe layer, layer4.2
= SA_5_3, unless the options name another method or layer), then its deletion and insertion
AUCs and ROAD (:func:`sanet_viz.faithfulness.measure`, the per-image analysis's definitions).

Per-image values are kept in per-sample slots of the run's sums: one (N,) array per measure and
model, N = the samples of the whole run, each value written at its sample's index and zero
elsewhere. Summed over ranks (every slot written by exactly one rank: x + 0 = x, exactly) they are
every image's value, and checkpoints carry them like the counts. The summary's bootstrap then
resamples the same per-image values whatever the number of processes.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import charts, models
from ..cam import compute_cam
from ..faithfulness import ROAD_PERCENTILES, Curve, Faithfulness, bootstrap_mean_ci, measure
from ..lab import Lab, LoadedModel
from ..weights import untrained_warning

__all__ = ["MEASURED", "MEASURES", "zero_sums", "evaluate", "commit", "summary", "write_files"]

MEASURED = "faithfulness.measured"  # (N,) 1 where the sample's image was measured
# Per-image measures: name -> (reading of a paired difference SANet50 - ResNet50, sign of "better").
MEASURES = {"deletion_auc": ("negative: SANet50's maps delete the class faster (more faithful)", -1),
            "insertion_auc": ("positive: SANet50's maps restore the class faster (more faithful)", 1),
            "road_combined": ("positive: SANet50's maps are more faithful by ROAD", 1)}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def _key(model: str, name: str) -> str:
    return f"{model}.faithfulness.{name}"


def zero_sums(lab: Lab, samples: int, steps: int, device: torch.device) -> dict[str, Tensor]:
    """The faithfulness slots of a run's sums (see the module docstring)."""
    f64 = {"dtype": torch.float64, "device": device}
    sums = {MEASURED: torch.zeros(samples, dtype=torch.int64, device=device)}
    for key in lab.models:
        sums.update({_key(key, name): torch.zeros(samples, **f64) for name in MEASURES})
        sums[_key(key, "deletion_curve")] = torch.zeros(steps + 1, **f64)
        sums[_key(key, "insertion_curve")] = torch.zeros(steps + 1, **f64)
        sums[_key(key, "road_morf")] = torch.zeros(len(ROAD_PERCENTILES), **f64)
        sums[_key(key, "road_lerf")] = torch.zeros(len(ROAD_PERCENTILES), **f64)
    return sums


def evaluate(lm: LoadedModel, x: Tensor, predicted: Tensor, *, steps: int, precision: str, batch_size: int,
             method: str, layer: str | None) -> list[Faithfulness]:
    """Per image of the batch ``x``: the CAM of its predicted class, then its faithfulness."""
    out = []
    for i, c in enumerate(predicted.tolist()):
        xi = x[i:i + 1].contiguous()
        with lm.lock:
            cam = compute_cam(lm.model, xi, method=method, layer=layer or lm.probe_layer, target_class=c).cam
            out.append(measure(lm, xi, cam, c, steps=steps, precision=precision, batch_size=batch_size))
    return out


def commit(sums: dict[str, Tensor], indices: Tensor, outs: Mapping[str, list[Faithfulness]]) -> None:
    """Write one batch's values into their samples' slots and add its curves."""
    indices = indices.to(sums[MEASURED].device)
    sums[MEASURED][indices] = 1
    for key, results in outs.items():
        device = sums[_key(key, "deletion_auc")].device

        def column(values: list[float], device: torch.device = device) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        sums[_key(key, "deletion_auc")][indices] = column([f.deletion.auc for f in results])
        sums[_key(key, "insertion_auc")][indices] = column([f.insertion.auc for f in results])
        sums[_key(key, "road_combined")][indices] = column([f.road.combined for f in results])
        for f in results:
            sums[_key(key, "deletion_curve")] += column(list(f.deletion.scores))
            sums[_key(key, "insertion_curve")] += column(list(f.insertion.scores))
            sums[_key(key, "road_morf")] += column(list(f.road.morf))
            sums[_key(key, "road_lerf")] += column(list(f.road.lerf))


def _stat(values: np.ndarray) -> dict[str, Any]:
    mean, low, high = bootstrap_mean_ci(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    return {"mean": _finite(mean), "ci95": [_finite(low), _finite(high)]}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def per_image(sums: Mapping[str, np.ndarray], key: str, name: str) -> np.ndarray:
    """The measured images' values of one measure, in sample order."""
    return np.asarray(sums[_key(key, name)])[np.asarray(sums[MEASURED]) > 0]


def mean_curves(sums: Mapping[str, np.ndarray], key: str) -> tuple[Curve, Curve]:
    n = max(int((np.asarray(sums[MEASURED]) > 0).sum()), 1)
    return Curve(np.asarray(sums[_key(key, "deletion_curve")]) / n), \
        Curve(np.asarray(sums[_key(key, "insertion_curve")]) / n)


def summary(sums: Mapping[str, np.ndarray], info: Mapping[str, Mapping[str, Any]],
            measured: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's ``faithfulness``: what was ``measured`` (:func:`settings`), per model the
    means with 95% bootstrap intervals over images and the mean curves, and the paired difference
    SANet50 minus ResNet50 of each measure. ``info``: the result's per-model information."""
    images = int((np.asarray(sums[MEASURED]) > 0).sum())
    n = max(images, 1)
    out: dict[str, Any] = {**measured, "images": images, "percentiles": list(ROAD_PERCENTILES),
                           "confidence": f"95% percentile bootstrap over images ({BOOTSTRAP_RESAMPLES} resamples, "
                                         f"seed {BOOTSTRAP_SEED})", "models": {}}
    for key, m in info.items():
        deletion, insertion = mean_curves(sums, key)
        out["models"][key] = {
            "display_name": m["display_name"], "pretrained": m["pretrained"],
            **{name: _stat(per_image(sums, key, name)) for name in MEASURES},
            "deletion_curve": deletion.scores.tolist(), "insertion_curve": insertion.scores.tolist(),
            "road_morf": (np.asarray(sums[_key(key, "road_morf")]) / n).tolist(),
            "road_lerf": (np.asarray(sums[_key(key, "road_lerf")]) / n).tolist()}
    if {"resnet50", "sanet50"} <= set(info):
        out["paired_difference"] = {"of": "sanet50 - resnet50, per image", **{
            name: {**_stat(per_image(sums, "sanet50", name) - per_image(sums, "resnet50", name)), "reading": reading}
            for name, (reading, _) in MEASURES.items()}}
    untrained = [m["display_name"] for m in info.values() if not m["pretrained"]]
    out["note"] = (untrained_warning(untrained, subject="these faithfulness numbers") + ": they say nothing about "
                   "the published models") if untrained else None
    return out


def settings(lab: Lab, *, steps: int, method: str, layer: str | None) -> dict[str, Any]:
    """What was measured, for summary.json (the CAM explains each model's predicted class)."""
    layers = {layer or lm.probe_layer for lm in lab.models.values()}
    shown = layers.pop() if len(layers) == 1 else None
    return {"method": method, "layer": shown, "paper_name": models.paper_name_or_none(shown) if shown else None,
            "class": "predicted", "steps": steps}


def write_files(sums: Mapping[str, np.ndarray], info: Mapping[str, Mapping[str, Any]],
                block: Mapping[str, Any] | None, out: Path, *, sample_paths: Sequence[str] | None = None
                ) -> dict[str, Path]:
    """faithfulness.csv (means, intervals, paired differences), faithfulness_per_image.csv and
    faithfulness_curves.png (curves averaged over images) from summary.json's ``faithfulness``
    ``block``; nothing when it was not measured. ``sums``, ``info`` and ``sample_paths``: the
    result's sums, per-model information and samples (:class:`~.result.ReproduceResult`, which
    imports this module: taking its parts keeps the two free of an import cycle)."""
    if block is None:
        return {}
    rows: list[list[Any]] = [["measure", "model", "images", "mean", "ci95_low", "ci95_high"]]
    for name in MEASURES:
        for key, m in block["models"].items():
            rows.append([name, key, block["images"], m[name]["mean"], *m[name]["ci95"]])
        if "paired_difference" in block:
            d = block["paired_difference"][name]
            rows.append([name, "sanet50-resnet50", block["images"], d["mean"], *d["ci95"]])
    measured = np.flatnonzero(np.asarray(sums[MEASURED]) > 0)
    paths = sample_paths or []
    per_image_rows: list[list[Any]] = [["sample", "path"] + [f"{k}_{n}" for k in info for n in MEASURES]]
    per_image_rows += [[int(i), paths[i] if i < len(paths) else ""]
                       + [float(sums[_key(k, n)][i]) for k in info for n in MEASURES]
                       for i in measured]
    written = {}
    for name, table in (("faithfulness.csv", rows), ("faithfulness_per_image.csv", per_image_rows)):
        with open(out / name, "w", newline="") as f:
            csv.writer(f).writerows([["" if v is None else v for v in row] for row in table])
        written[name] = out / name
    names = {key: m["display_name"] for key, m in info.items()}
    fig = charts.faithfulness_curves(
        {names[k]: mean_curves(sums, k) for k in info},
        untrained=[names[k] for k, m in info.items() if not m["pretrained"]],
        title=f"Curves averaged over {block['images']} images ({block['method']} at {block['layer']}, predicted class)")
    charts.save(fig, str(out / "faithfulness_curves.png"))
    written["faithfulness_curves.png"] = out / "faithfulness_curves.png"
    return written
