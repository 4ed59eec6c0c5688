"""One entry point for the CLI, the app and the data-set tools: :func:`analyze`.

Per model and image: one fp32 forward+backward through pytorch-grad-cam gives the logits, the
CAM, the probe layer's features and (for SA models) the SA gates, all from the same pass; then
the 64 masked forwards of the group probe run batched, optionally in bf16.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import models
from .cam import CAM_METHODS, SINGLE_PASS_METHODS, compute_cam
from .hooks import FeatureCapture, SAGateRecorder, resolve_module
from .preprocessing import PreparedImage
from .probes import PROBE_GROUPS, GroupProbe, PrecisionCheck, group_maps, masked_scores, probe_masks
from .weights import IMAGENET_CATEGORIES, MODEL_SPECS, WeightsInfo, build_model

__all__ = [
    "LoadedModel", "Lab", "AnalysisOptions", "Prediction", "ModelResult", "AnalysisResult",
    "analyze", "explain", "add_probes", "explain_model", "probe_model", "resolve_device", "resolve_precision", "model_state_guard",
]

PROBE_LAYER = "layer4.2"  # SA_5_3


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; an unavailable ``cuda`` is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    return resolved


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it natively, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in {"fp32", "bf16"}:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU kernels are C++ built at run time: fail early, and say so, without one."""
    import shutil

    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ValueError(f"--compile on the CPU needs a C++ compiler ({compiler!r} is not on PATH): "
                             "install g++ (apt-get install g++) or run without --compile")


@dataclass
class LoadedModel:
    """A model shared by all requests: use it only while holding ``lock``."""

    key: str  # "resnet50" / "sanet50"
    display_name: str
    model: nn.Module
    weights: WeightsInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    categories: list[str] = field(default_factory=lambda: IMAGENET_CATEGORIES)
    probe_layer: str = PROBE_LAYER
    probe_groups: int = PROBE_GROUPS
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # For the probe's no-grad masked forwards: shuffle folded into conv3/bn3, BatchNorm fused
    # into the convs, channels_last (models.inference_copy). CAM and hooks use ``model``.
    fast_model: nn.Module | None = field(default=None, repr=False)
    use_fast_model: bool = True
    # torch.compile the masked-forward models (inductor with frozen weights), per precision on
    # first use: it pays over many images (benchmarks/bench_analysis.py --compile), not for one.
    compile_probe: bool = False

    def __post_init__(self) -> None:
        self._fast_model_bf16: nn.Module | None = None
        self._compiled: dict[str, nn.Module] = {}
        # The first probe under ``auto`` precision compares bf16 with fp32 on its image; later
        # probes follow the verdict (see probe_precision). Set and read holding ``lock``.
        self.bf16_check: PrecisionCheck | None = None
        self.model.to(self.device).eval().requires_grad_(False)
        self.sa_modules = models.sa_module_names(self.model)  # paper name -> module name
        resolve_module(self.model, self.probe_layer)  # fail early on a wrong probe layer
        if self.fast_model is None and self.use_fast_model:
            self.fast_model = models.inference_copy(self.model, channels_last=True)
        if self.fast_model is not None:
            self.fast_model.to(self.device).eval().requires_grad_(False)

    @property
    def probe_forward_model(self) -> nn.Module:
        return self.fast_model if self.fast_model is not None else self.model

    def probe_model_for(self, precision: str) -> nn.Module:
        """The model for masked forwards at ``precision``; call it holding ``lock``.

        bf16 uses a copy with bf16 weights (made on first use): autocast would cast every
        convolution's weights again on each forward.
        """
        if precision != "bf16" or self.fast_model is None:
            model = self.probe_forward_model
        else:
            if self._fast_model_bf16 is None:
                self._fast_model_bf16 = copy.deepcopy(self.fast_model).to(torch.bfloat16)
            model = self._fast_model_bf16
        if not self.compile_probe:
            return model
        if precision not in self._compiled:
            # Frozen weights let inductor fold them into its kernels; every batch has the same
            # shape except a last partial one, so no dynamic shapes.
            self._compiled[precision] = torch.compile(model, options={"freezing": True}, dynamic=False)
        return self._compiled[precision]

    def probe_precision(self, requested: str) -> str:
        """The precision of the next probe: ``fp32``, ``bf16``, or ``check`` (run both, compare).

        An explicit fp32/bf16 is obeyed. ``auto`` is fp32 without native bf16; otherwise it is
        ``check`` until this model has a :class:`PrecisionCheck`, then bf16 if it passed.
        """
        if requested != "auto":
            return resolve_precision(requested, self.device)
        if resolve_precision("auto", self.device) == "fp32":
            return "fp32"
        if self.bf16_check is None:
            return "check"
        return "bf16" if self.bf16_check.passed else "fp32"

    @property
    def has_sa(self) -> bool:
        return bool(self.sa_modules)


class Lab:
    """The models one process serves, loaded once."""

    def __init__(self, loaded: Mapping[str, LoadedModel]) -> None:
        self.models: dict[str, LoadedModel] = dict(loaded)

    @classmethod
    def load(cls, *, resnet50: str | None = None, sanet50: str | None = None, device: str = "auto",
             weights_dir: Path | None = None, require_pretrained: bool = False,
             compile_probe: bool = False, log: Callable[[str], None] | None = None) -> Lab:
        target = resolve_device(device)
        if compile_probe:
            check_compiler(target)
        loaded = {}
        for key, explicit in (("resnet50", resnet50), ("sanet50", sanet50)):
            spec = MODEL_SPECS[key]
            start = time.perf_counter()
            model, info = build_model(spec, explicit, weights_dir=weights_dir,
                                      require_pretrained=require_pretrained)
            loaded[key] = LoadedModel(key, spec.display_name, model, info, target, compile_probe=compile_probe)
            if log:
                state = "pretrained" if info.pretrained else f"UNTRAINED ({info.note})"
                log(f"{spec.display_name}: {state}; weights: {info.source}; on {target}; "
                    f"{time.perf_counter() - start:.1f} s")
        return cls(loaded)

    @property
    def device(self) -> torch.device:
        return next(iter(self.models.values())).device


@dataclass(frozen=True)
class AnalysisOptions:
    method: str = "gradcam"
    target_class: int | None = None  # None: each model explains its own top-1
    cam_layer: str | None = None  # None: the probe layer (layer4.2); paper names accepted
    precision: str = "auto"  # of the probe's masked forwards; CAM is always fp32
    probe: bool = True
    probe_models: tuple[str, ...] | None = None  # None: every model
    probe_batch_size: int = 16
    gates: bool = True

    def __post_init__(self) -> None:
        if self.method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {self.method!r}; choose from {', '.join(CAM_METHODS)}")
        if self.target_class is not None and not 0 <= self.target_class < 1000:
            raise ValueError(f"target class must be an ImageNet index 0..999, got {self.target_class}")
        if self.precision not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.probe_batch_size < 1:
            raise ValueError("probe batch size must be at least 1")


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float
    logit: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "prob": self.prob, "logit": self.logit}


@dataclass
class ModelResult:
    key: str
    display_name: str
    weights: WeightsInfo
    top5: list[Prediction]
    target_class: int
    cam: np.ndarray  # (H, W) float32 in [0, 1]
    cam_method: str
    cam_layer: str
    group_maps: np.ndarray  # (G, h, w) raw channel means of the probe layer's chunks
    probe: GroupProbe | None
    sa_gates: dict[str, dict[str, np.ndarray]] | None  # paper name -> channel/spatial (G,)
    sa_spatial_maps: np.ndarray | None  # (G, h, w) spatial gate maps of SA_5_3
    precision: str
    timings_ms: dict[str, float]
    logits: np.ndarray  # (num_classes,) fp32 of the unmasked image
    precision_check: PrecisionCheck | None = None  # the model's bf16 check, once there is one

    def to_dict(self, cam_file: str | None = None) -> dict[str, Any]:
        layer_name = self.cam_layer
        with_paper = _paper_or_none(layer_name)
        out: dict[str, Any] = {
            "display_name": self.display_name,
            "weights": self.weights.to_dict(),
            "pretrained": self.weights.pretrained,
            "top5": [p.to_dict() for p in self.top5],
            "target_class": self.target_class,
            "target_label": IMAGENET_CATEGORIES[self.target_class] if self.target_class < 1000 else str(self.target_class),
            "cam": {"method": self.cam_method, "layer": layer_name, "paper_name": with_paper,
                    "file": cam_file},
            "group_probe": self.probe.to_dict() if self.probe else None,
            "probe_precision": self.precision,
            "bf16_check": self.precision_check.to_dict() if self.precision_check else None,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }
        if self.sa_gates is not None:
            out["sa_gates"] = {name: {"channel": g["channel"].tolist(), "spatial": g["spatial"].tolist()}
                               for name, g in self.sa_gates.items()}
        return out


def _paper_or_none(module_name: str) -> str | None:
    try:
        return models.module_to_paper_name(module_name.removesuffix(".sa"))
    except ValueError:
        return None


@dataclass
class AnalysisResult:
    image_name: str
    display: np.ndarray  # (224, 224, 3) uint8 crop the models saw
    original_size: tuple[int, int]
    models: dict[str, ModelResult]
    options: AnalysisOptions
    timings_ms: dict[str, float]

    @property
    def all_pretrained(self) -> bool:
        return all(m.weights.pretrained for m in self.models.values())

    def to_dict(self, cam_files: Mapping[str, str] | None = None) -> dict[str, Any]:
        cam_files = cam_files or {}
        return {
            "image": self.image_name,
            "original_size": list(self.original_size),
            "pretrained": self.all_pretrained,
            "warning": None if self.all_pretrained else untrained_warning(self),
            "options": {"method": self.options.method, "target_class": self.options.target_class,
                        "cam_layer": self.options.cam_layer, "precision": self.options.precision},
            "models": {k: m.to_dict(cam_files.get(k)) for k, m in self.models.items()},
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


def untrained_warning(result: AnalysisResult) -> str:
    names = [m.display_name for m in result.models.values() if not m.weights.pretrained]
    return (f"{' and '.join(names)} ran with UNTRAINED weights: predictions, heatmaps and probes "
            "are not those of the pretrained model. See README, 'Weights'.")


@contextmanager
def model_state_guard(model: nn.Module) -> Iterator[None]:
    """Restore train/eval modes and requires_grad flags, and drop stray ``.grad``, on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = None


def _top5(logits: Tensor, categories: list[str]) -> list[Prediction]:
    probs = torch.softmax(logits.float(), -1)[0]
    top = probs.topk(min(5, probs.numel()))
    return [Prediction(int(i), categories[int(i)] if int(i) < len(categories) else str(int(i)),
                       float(p), float(logits[0, int(i)]))
            for p, i in zip(top.values, top.indices)]


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

    with model_state_guard(lm.model):
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
        top5=_top5(cam.logits.cpu(), lm.categories), target_class=cam.target_class, cam=cam.cam,
        cam_method=options.method, cam_layer=cam_layer,
        group_maps=group_maps(capture.outputs[lm.probe_layer], lm.probe_groups)[0].cpu().numpy(),
        probe=None, sa_gates=sa_gates, sa_spatial_maps=sa_maps,
        precision=lm.probe_precision(options.precision).replace("check", "fp32"), timings_ms=timings,
        logits=logits.numpy())


def probe_model(lm: LoadedModel, image: PreparedImage, result: ModelResult,
                options: AnalysisOptions, *, name: str = "image") -> GroupProbe:
    """The per-group probe from an explained result's group maps (hold ``lm.lock``).

    Under ``auto`` precision the model's first probe runs in fp32 and in bf16 and records the
    comparison (:attr:`LoadedModel.bf16_check`); this image gets the fp32 scores.
    """
    t = time.perf_counter()
    x = image.tensor.to(lm.device)
    predicted = int(np.argmax(result.logits))
    masks = probe_masks(torch.from_numpy(result.group_maps)[None].to(lm.device), tuple(x.shape[-2:]))
    classes = torch.tensor([predicted])

    def run(precision: str) -> tuple[Tensor, Tensor]:
        return masked_scores(lm.probe_model_for(precision), x, masks, classes,
                             batch_size=options.probe_batch_size, precision=precision,
                             channels_last=lm.fast_model is not None)

    precision = lm.probe_precision(options.precision)
    if precision == "check":
        scores, preds = run("fp32")
        lm.bf16_check = PrecisionCheck.compare(scores[0], run("bf16")[0][0], name)
        precision = "fp32"
    else:
        scores, preds = run(precision)
    result.precision, result.precision_check = precision, lm.bf16_check
    unmasked = float(torch.softmax(torch.from_numpy(result.logits), -1)[predicted])
    result.timings_ms["probe"] = (time.perf_counter() - t) * 1e3
    return GroupProbe(lm.probe_layer, _paper_or_none(lm.probe_layer) or lm.probe_layer, lm.probe_groups,
                      predicted, scores[0].cpu(), preds[0].cpu(), unmasked)


def _wants_probe(options: AnalysisOptions, key: str) -> bool:
    return options.probe and (options.probe_models is None or key in options.probe_models)


def explain(lab: Lab, image: PreparedImage, options: AnalysisOptions = AnalysisOptions(), *,
            name: str = "image", model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """CAMs, predictions and gates of each model, without probes (the app's first, fast step)."""
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


def analyze(lab: Lab, image: PreparedImage, options: AnalysisOptions = AnalysisOptions(), *,
            name: str = "image", model_keys: tuple[str, ...] | None = None) -> AnalysisResult:
    """Everything for one prepared image: :func:`explain`, then :func:`add_probes`."""
    result = explain(lab, image, options, name=name, model_keys=model_keys)
    add_probes(lab, image, result)
    result.timings_ms["total"] = sum(result.timings_ms.values())
    return result
