"""One entry point for the CLI, the app and the data-set tools: :func:`analyze`.

Per model and image: one fp32 forward+backward through pytorch-grad-cam gives the logits, the
CAM, the probe layer's features and (for SA models) the SA gates, all from the same pass; then
the 64 masked forwards of the group probe run batched, optionally in bf16.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from . import faithfulness, models
from .attention import GateProfile
from .cam import MULTI_PASS_METHODS, BatchedAblationCAM, BatchedScoreCAM, compute_cam
from .hooks import FeatureCapture, GateRecorder, ModelStateGuard
from .lab import Lab, LoadedModel
from .preprocessing import PreparedImage
from .probes import GroupProbe, PrecisionCheck, group_maps
from .progress import ProgressFn
from .results import AnalysisOptions, AnalysisResult, ModelResult, Prediction

__all__ = ["AnalysisOptions", "AnalysisResult", "ModelResult", "analyze", "explain", "add_probes",
           "explain_model", "complete_cam", "slow_cam_forwards", "probe_model", "add_faithfulness",
           "add_randomization", "faithfulness_verdict"]


def _top5(logits: Tensor, lm: LoadedModel) -> list[Prediction]:
    probs = torch.softmax(logits.float(), -1)[0]
    top = probs.topk(min(5, probs.numel()))
    return [Prediction(int(i), lm.label(int(i)), float(p), float(logits[0, int(i)]))
            for p, i in zip(top.values, top.indices, strict=True)]


def explain_model(lm: LoadedModel, image: PreparedImage, options: AnalysisOptions, *,
                  progress: ProgressFn | None = None, defer_slow: bool = False) -> ModelResult:
    """The CAM pass for one model: logits, CAM, probe-layer group maps and SA gates.

    Takes ``lm.lock`` itself, for one hooked pass of the shared model: for single-pass CAM
    methods one fp32 forward+backward serves everything. Multi-pass methods (Score-CAM,
    Ablation-CAM) make one plain hooked forward there, then run their thousands of forwards
    without the lock (:func:`complete_cam`), so other requests are not held up; with
    ``defer_slow`` the result comes back with ``cam`` None and ``pending_cam`` set, for the caller
    to complete later. The probe is left to :func:`probe_model`.
    """
    x = image.tensor_for(lm.transform).to(lm.device)
    layer = options.cam_layer or lm.probe_layer
    cam_layer = models.paper_name_to_module(layer) if layer.startswith("SA_") else layer
    keep_maps = [models.module_to_paper_name(lm.probe_layer)] if lm.has_sa else []
    gate_modules = lm.gate_modules if options.gates else {}
    if options.target_class is not None:
        lm.check_class(options.target_class)
    slow = options.method in MULTI_PASS_METHODS
    start = time.perf_counter()
    with lm.lock, ModelStateGuard(lm.model), \
            FeatureCapture(lm.model, dict.fromkeys([lm.probe_layer, cam_layer])) as capture, \
            GateRecorder(lm.model, lm.gate_layout, gate_modules, keep_maps=keep_maps) as gates:
        if slow:
            with torch.no_grad():
                logits = lm.model(x).float().detach()
            cam = None
        else:
            cam = compute_cam(lm.model, x, method=options.method, layer=cam_layer, target_class=options.target_class)
            logits = cam.logits
    target = cam.target_class if cam is not None else (
        options.target_class if options.target_class is not None else int(logits.argmax(-1)))
    profile = sa_maps = None
    if gate_modules:
        profile = GateProfile(lm.gate_layout, {depth: {b: v[0].cpu().numpy() for b, v in gates.values[depth].items()}
                                               for depth in gate_modules})  # type: ignore[arg-type]
        sa_maps = gates.spatial_maps[keep_maps[0]][0].cpu().numpy() if keep_maps else None
    result = ModelResult(
        key=lm.key, display_name=lm.display_name, weights=lm.weights,
        top5=_top5(logits.cpu(), lm), target_class=target, target_label=lm.label(target),
        cam=cam.cam if cam is not None else None, cam_method=options.method, cam_layer=cam_layer,
        group_maps=group_maps(capture.outputs[lm.probe_layer], lm.probe_groups)[0].cpu().numpy(),
        probe=None, sa_gates=profile.values if profile is not None and lm.has_sa else None, gates=profile,
        sa_spatial_maps=sa_maps,
        precision=lm.probe_precision(options.precision).replace("check", "fp32"),
        timings_ms={"cam": (time.perf_counter() - start) * 1e3}, logits=logits[0].cpu().numpy(),
        pending_cam=capture.outputs[cam_layer] if slow else None)
    if slow and not defer_slow:
        complete_cam(lm, image, result, options, progress=progress)
    return result


def slow_cam_forwards(lm: LoadedModel, result: ModelResult) -> int:
    """Forwards (or classifier-tail passes) a pending multi-pass CAM will run: for estimates."""
    if result.pending_cam is None:
        return 0
    return int(result.pending_cam.shape[1])


def complete_cam(lm: LoadedModel, image: PreparedImage, result: ModelResult, options: AnalysisOptions, *,
                 progress: ProgressFn | None = None) -> ModelResult:
    """Compute a pending multi-pass CAM (see :func:`explain_model`), outside ``lm.lock``.

    Score-CAM's masked forwards run batched on the model's inference copy, in the precision the
    probe's rule allows (bf16 only once the model's bf16 check has passed); Ablation-CAM runs only
    the layers after the target layer. Where neither applies (no inference copy; Ablation-CAM at
    a layer that is not a ReLU output), pytorch-grad-cam runs on the model under the lock.
    ``progress`` may raise :class:`progress.Cancelled` between batches.
    """
    if result.pending_cam is None:
        return result
    start = time.perf_counter()
    x = image.tensor_for(lm.transform).to(lm.device)
    acts, target = result.pending_cam, result.target_class
    fast = lm.fast_model is not None and result.cam_layer in models.bottleneck_names(lm.model)
    if options.method == "scorecam" and lm.fast_model is not None:
        precision = lm.probe_precision(options.precision).replace("check", "fp32")
        with lm.lock:  # the bf16 copy is made on first use
            model = lm.probe_model_for(precision)
        dtype = next(model.parameters()).dtype

        def forward(batch: Tensor) -> Tensor:
            with torch.no_grad():
                return model(batch.to(dtype).contiguous(memory_format=torch.channels_last)).float()

        cam = BatchedScoreCAM(forward, batch_size=options.probe_batch_size, progress=progress,
                              device=lm.device).cam_from(x, acts, target)
    elif options.method == "ablationcam" and fast and BatchedAblationCAM.applies_to(acts):
        tail = models.tail_after(lm.fast_model, result.cam_layer, reference_order=True)  # type: ignore[arg-type]
        cam = BatchedAblationCAM(lambda a: tail(a.contiguous(memory_format=torch.channels_last)).float(),
                                 progress=progress, device=lm.device).cam_from(x, acts, target)
    else:
        with lm.lock:
            cam = compute_cam(lm.model, x, method=options.method, layer=result.cam_layer, target_class=target).cam
    result.cam, result.pending_cam = np.asarray(cam, dtype=np.float32), None
    result.timings_ms["cam"] = result.timings_ms.get("cam", 0.0) + (time.perf_counter() - start) * 1e3
    return result


def probe_model(lm: LoadedModel, image: PreparedImage, result: ModelResult,
                options: AnalysisOptions, *, name: str = "image") -> GroupProbe:
    """The per-group probe from an explained result's group maps (hold ``lm.lock``).

    Under ``auto`` precision the model's first probe runs in fp32 and in bf16, and in mixed
    precision where bf16 fails the rule, and records the comparison (:attr:`LoadedModel.bf16_check`);
    this image gets the fp32 scores.
    """
    t = time.perf_counter()
    x = image.tensor_for(lm.transform).to(lm.device)
    predicted = int(np.argmax(result.logits))
    maps = torch.from_numpy(result.group_maps)[None]
    classes = torch.tensor([predicted])

    def run(precision: str) -> tuple[Tensor, Tensor]:
        start = time.perf_counter()
        out = lm.run_probe(x, maps, classes, precision=precision, batch_size=options.probe_batch_size)
        lm.forward_ms[precision] = (time.perf_counter() - start) * 1e3 / maps.shape[1]
        return out

    precision = lm.probe_precision(options.precision)
    if precision == "check":
        scores, preds = run("fp32")
        lm.bf16_check = _check_precisions(
            scores[0], run, name, fp32_seconds=time.perf_counter() - t,
            timing=lambda precisions: lm.probe_batch_ms(x, maps, precisions, batch_size=options.probe_batch_size))
        precision = "fp32"
    else:
        scores, preds = run(precision)
    result.precision, result.precision_check = precision, lm.bf16_check
    unmasked = float(torch.softmax(torch.from_numpy(result.logits), -1)[predicted])
    result.timings_ms["probe"] = (time.perf_counter() - t) * 1e3
    return GroupProbe(lm.probe_layer, models.paper_name_or_none(lm.probe_layer) or lm.probe_layer, lm.probe_groups,
                      predicted, scores[0].cpu(), preds[0].cpu(), unmasked)


def _check_precisions(fp32: Tensor, run: Callable[[str], tuple[Tensor, Tensor]], name: str, *,
                      fp32_seconds: float, timing: Callable[[list[str]], dict[str, float]]) -> PrecisionCheck:
    """bf16 against the fp32 scores, and mixed precision where bf16 fails the rule; then the
    precisions that passed are timed against fp32 in turns (``timing``), for the speed rule."""
    seconds = {"fp32": fp32_seconds}
    t = time.perf_counter()
    bf16 = run("bf16")[0][0]
    seconds["bf16"] = time.perf_counter() - t
    check = PrecisionCheck.compare(fp32, bf16, name, seconds=seconds)
    if not check.passed:
        t = time.perf_counter()
        mixed = PrecisionCheck.compare(fp32, run("mixed")[0][0], name)
        seconds["mixed"] = time.perf_counter() - t
        check = PrecisionCheck.compare(fp32, bf16, name, seconds=seconds, mixed=mixed)
    candidates = check.candidates()
    return replace(check, timing_ms=timing(["fp32", *candidates])) if candidates else check


def _wants_probe(options: AnalysisOptions, key: str) -> bool:
    return options.probe and (options.probe_models is None or key in options.probe_models)


def explain(lab: Lab, image: PreparedImage, options: AnalysisOptions | None = None, *,
            name: str = "image", model_keys: tuple[str, ...] | None = None, progress: ProgressFn | None = None,
            defer_slow: bool = False) -> AnalysisResult:
    """CAMs, predictions and gates of each model, without probes (the app's first, fast step).

    ``defer_slow``: multi-pass CAMs are left pending (see :func:`explain_model`).
    """
    options = options or AnalysisOptions()
    start = time.perf_counter()
    results: dict[str, ModelResult] = {}
    for key, lm in lab.models.items():
        if model_keys is None or key in model_keys:
            results[key] = explain_model(lm, image, options, progress=progress, defer_slow=defer_slow)
    return AnalysisResult(name, image.display, image.original_size, results, options,
                          {"explain": (time.perf_counter() - start) * 1e3}, image.preview, image.crop_box)


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


def add_faithfulness(lab: Lab, image: PreparedImage, result: AnalysisResult, *,
                     model_keys: tuple[str, ...] | None = None, randomization: bool | None = None,
                     progress: ProgressFn | None = None) -> AnalysisResult:
    """Deletion, insertion and ROAD of each model's CAM as saved (:mod:`sanet_viz.faithfulness`);
    with ``randomization`` (default: the options' ``faithfulness_randomization``) also the
    randomisation cascade. Runs after the probe, so ``auto`` precision follows its bf16 check.
    Models that already have the measures are not measured again."""
    options = result.options
    cascade = options.faithfulness_randomization if randomization is None else randomization
    start = time.perf_counter()
    for key, mr in result.models.items():
        if model_keys is not None and key not in model_keys:
            continue
        lm = lab.models[key]
        with lm.lock:
            if mr.faithfulness is None:
                t = time.perf_counter()
                mr.faithfulness = faithfulness.measure(
                    lm, image.tensor_for(lm.transform), mr.cam, mr.target_class, steps=options.faithfulness_steps,
                    precision=options.precision, batch_size=options.probe_batch_size, progress_fn=progress)
                mr.timings_ms["faithfulness"] = (time.perf_counter() - t) * 1e3
        if cascade:
            add_randomization(lab, image, result, model_keys=(key,), progress=progress)
    result.timings_ms["faithfulness"] = (time.perf_counter() - start) * 1e3
    return result


def add_randomization(lab: Lab, image: PreparedImage, result: AnalysisResult, *,
                      model_keys: tuple[str, ...] | None = None, progress: ProgressFn | None = None) -> AnalysisResult:
    """The randomisation cascade of each model's CAM (one CAM per block: the app runs it on
    demand), into the faithfulness measures (:func:`add_faithfulness` first)."""
    for key, mr in result.models.items():
        if model_keys is not None and key not in model_keys:
            continue
        if mr.faithfulness is None:
            raise ValueError(f"{mr.display_name}: measure faithfulness (add_faithfulness) before the randomisation")
        if mr.faithfulness.randomization is None:
            lm = lab.models[key]
            with lm.lock:
                t = time.perf_counter()
                mr.faithfulness.randomization = faithfulness.measure_randomization(
                    lm, image.tensor_for(lm.transform), mr.cam, mr.target_class, method=mr.cam_method,
                    layer=mr.cam_layer, progress_fn=progress)
                mr.timings_ms["randomization"] = (time.perf_counter() - t) * 1e3
    return result


def faithfulness_verdict(result: AnalysisResult) -> str | None:
    """:func:`faithfulness.verdict` of the measured models (None when none was measured)."""
    measured = {m.display_name: m.faithfulness for m in result.models.values() if m.faithfulness is not None}
    if not measured:
        return None
    untrained = [m.display_name for m in result.models.values() if m.faithfulness is not None
                 and not m.weights.pretrained]
    return faithfulness.verdict(measured, untrained=untrained)


def analyze(lab: Lab, image: PreparedImage, options: AnalysisOptions | None = None, *,
            name: str = "image", model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """Everything for one prepared image: :func:`explain`, :func:`add_probes`, and when asked
    :func:`add_faithfulness`."""
    result = explain(lab, image, options or AnalysisOptions(), name=name, model_keys=model_keys)
    add_probes(lab, image, result)
    if result.options.faithfulness:
        add_faithfulness(lab, image, result)
    result.timings_ms["total"] = sum(result.timings_ms.values())
    return result
