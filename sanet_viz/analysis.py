"""One entry point for the CLI, the app and the data-set tools: :func:`analyze`.

Per model and image: one fp32 forward+backward through pytorch-grad-cam gives the logits, the
CAM, the probe layer's features and (for SA models) the SA gates, all from the same pass; then
the 64 masked forwards of the group probe run batched, optionally in bf16.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from . import models
from .cam import SINGLE_PASS_METHODS, compute_cam
from .hooks import FeatureCapture, ModelStateGuard, SAGateRecorder
from .lab import Lab, LoadedModel
from .preprocessing import PreparedImage
from .probes import GroupProbe, PrecisionCheck, group_maps
from .results import AnalysisOptions, AnalysisResult, ModelResult, Prediction

__all__ = ["AnalysisOptions", "AnalysisResult", "ModelResult", "analyze", "explain", "add_probes",
           "explain_model", "probe_model"]


def _top5(logits: Tensor, lm: LoadedModel) -> list[Prediction]:
    probs = torch.softmax(logits.float(), -1)[0]
    top = probs.topk(min(5, probs.numel()))
    return [Prediction(int(i), lm.label(int(i)), float(p), float(logits[0, int(i)]))
            for p, i in zip(top.values, top.indices, strict=True)]


def explain_model(lm: LoadedModel, image: PreparedImage, options: AnalysisOptions) -> ModelResult:
    """The CAM pass for one model: logits, CAM, probe-layer group maps and SA gates.

    One fp32 forward+backward serves all of them for single-pass CAM methods. Call it holding
    ``lm.lock`` (``analyze`` does). The probe is left to :func:`probe_model`.
    """
    timings: dict[str, float] = {}
    x = image.tensor.to(lm.device)
    layer = options.cam_layer or lm.probe_layer
    cam_layer = models.paper_name_to_module(layer) if layer.startswith("SA_") else layer
    keep_maps = [models.module_to_paper_name(lm.probe_layer)] if lm.has_sa else []
    gate_modules = lm.sa_modules if (options.gates and lm.has_sa) else {}

    if options.target_class is not None:
        lm.check_class(options.target_class)
    with ModelStateGuard(lm.model):
        t = time.perf_counter()
        with FeatureCapture(lm.model, [lm.probe_layer]) as capture, \
                SAGateRecorder(lm.model, gate_modules, keep_maps=keep_maps) as gates:
            if options.method in SINGLE_PASS_METHODS:
                cam = compute_cam(lm.model, x, method=options.method, layer=cam_layer,
                                  target_class=options.target_class)
            else:  # multi-pass CAMs run many forwards: hook a plain one instead
                with torch.no_grad():
                    lm.model(x)
        if options.method not in SINGLE_PASS_METHODS:
            cam = compute_cam(lm.model, x, method=options.method, layer=cam_layer,
                              target_class=options.target_class)
        timings["cam"] = (time.perf_counter() - t) * 1e3

    sa_gates = sa_maps = None
    if gate_modules:
        sa_gates = {name: {"channel": gates.channel[name][0].cpu().numpy(),
                           "spatial": gates.spatial[name][0].cpu().numpy()} for name in gate_modules}
        sa_maps = gates.spatial_maps[keep_maps[0]][0].cpu().numpy() if keep_maps else None
    logits = cam.logits[0].cpu()
    return ModelResult(
        key=lm.key, display_name=lm.display_name, weights=lm.weights,
        top5=_top5(cam.logits.cpu(), lm), target_class=cam.target_class, target_label=lm.label(cam.target_class),
        cam=cam.cam,
        cam_method=options.method, cam_layer=cam_layer,
        group_maps=group_maps(capture.outputs[lm.probe_layer], lm.probe_groups)[0].cpu().numpy(),
        probe=None, sa_gates=sa_gates, sa_spatial_maps=sa_maps,
        precision=lm.probe_precision(options.precision).replace("check", "fp32"), timings_ms=timings,
        logits=logits.numpy())


def probe_model(lm: LoadedModel, image: PreparedImage, result: ModelResult,
                options: AnalysisOptions, *, name: str = "image") -> GroupProbe:
    """The per-group probe from an explained result's group maps (hold ``lm.lock``).

    Under ``auto`` precision the model's first probe runs in fp32 and in bf16, and in mixed
    precision where bf16 fails the rule, and records the comparison (:attr:`LoadedModel.bf16_check`);
    this image gets the fp32 scores.
    """
    t = time.perf_counter()
    x = image.tensor.to(lm.device)
    predicted = int(np.argmax(result.logits))
    maps = torch.from_numpy(result.group_maps)[None]
    classes = torch.tensor([predicted])

    def run(precision: str) -> tuple[Tensor, Tensor]:
        return lm.run_probe(x, maps, classes, precision=precision, batch_size=options.probe_batch_size)

    precision = lm.probe_precision(options.precision)
    if precision == "check":
        scores, preds = run("fp32")
        lm.bf16_check = _check_precisions(scores[0], run, name, fp32_seconds=time.perf_counter() - t)
        precision = "fp32"
    else:
        scores, preds = run(precision)
    result.precision, result.precision_check = precision, lm.bf16_check
    unmasked = float(torch.softmax(torch.from_numpy(result.logits), -1)[predicted])
    result.timings_ms["probe"] = (time.perf_counter() - t) * 1e3
    return GroupProbe(lm.probe_layer, models.paper_name_or_none(lm.probe_layer) or lm.probe_layer, lm.probe_groups,
                      predicted, scores[0].cpu(), preds[0].cpu(), unmasked)


def _check_precisions(fp32: Tensor, run: Callable[[str], tuple[Tensor, Tensor]], name: str, *,
                      fp32_seconds: float) -> PrecisionCheck:
    """bf16 against the fp32 scores, and mixed precision where bf16 fails the rule."""
    seconds = {"fp32": fp32_seconds}
    t = time.perf_counter()
    bf16 = run("bf16")[0][0]
    seconds["bf16"] = time.perf_counter() - t
    check = PrecisionCheck.compare(fp32, bf16, name, seconds=seconds)
    if check.passed:
        return check
    t = time.perf_counter()
    mixed = PrecisionCheck.compare(fp32, run("mixed")[0][0], name)
    seconds["mixed"] = time.perf_counter() - t
    return PrecisionCheck.compare(fp32, bf16, name, seconds=seconds, mixed=mixed)


def _wants_probe(options: AnalysisOptions, key: str) -> bool:
    return options.probe and (options.probe_models is None or key in options.probe_models)


def explain(lab: Lab, image: PreparedImage, options: AnalysisOptions | None = None, *,
            name: str = "image", model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """CAMs, predictions and gates of each model, without probes (the app's first, fast step)."""
    options = options or AnalysisOptions()
    start = time.perf_counter()
    results: dict[str, ModelResult] = {}
    for key, lm in lab.models.items():
        if model_keys is None or key in model_keys:
            with lm.lock:
                results[key] = explain_model(lm, image, options)
    return AnalysisResult(name, image.display, image.original_size, results, options,
                          {"explain": (time.perf_counter() - start) * 1e3})


def add_probes(lab: Lab, image: PreparedImage, result: AnalysisResult, *,
               model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """Fill in the group probes of an :func:`explain` result (models chosen by its options)."""
    start = time.perf_counter()
    for key, mr in result.models.items():
        if model_keys is not None and key not in model_keys:
            continue
        if _wants_probe(result.options, key) and mr.probe is None:
            lm = lab.models[key]
            with lm.lock:
                mr.probe = probe_model(lm, image, mr, result.options, name=result.image_name)
    result.timings_ms["probes"] = result.timings_ms.get("probes", 0.0) + (time.perf_counter() - start) * 1e3
    return result


def analyze(lab: Lab, image: PreparedImage, options: AnalysisOptions | None = None, *,
            name: str = "image", model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """Everything for one prepared image: :func:`explain`, then :func:`add_probes`."""
    result = explain(lab, image, options or AnalysisOptions(), name=name, model_keys=model_keys)
    add_probes(lab, image, result)
    result.timings_ms["total"] = sum(result.timings_ms.values())
    return result
