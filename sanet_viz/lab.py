"""The models one process serves: :class:`LoadedModel` (a model, its weights, its inference
copies and its lock) and :class:`Lab` (all of them, loaded once), with device and precision rules.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import attention, models
from .hooks import resolve_module
from .preprocessing import DEFAULT_LIMITS, DecodeLimits, ImageInput, PreparedImage, load_and_prepare
from .probes import (
    PROBE_GROUPS,
    PrecisionCheck,
    best_interleaved_ms,
    forward_logits,
    probe_masks,
    probe_scores,
)
from .weights import (
    DEFAULT_MODELS,
    IMAGENET_CATEGORIES,
    IMAGENET_EVAL,
    MODEL_SPECS,
    EvalTransform,
    WeightsInfo,
    build_model,
)

__all__ = ["LoadedModel", "Lab", "load_model", "fuse_sa_tail", "PROBE_LAYER", "resolve_device", "bf16_supported",
           "resolve_precision", "check_compiler"]

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
    """``auto`` -> bf16 where the hardware runs it natively, else fp32; fp32, mixed, bf16 as given."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in {"fp32", "mixed", "bf16"}:
        raise ValueError(f"precision must be auto, fp32, mixed or bf16, got {precision!r}")
    return precision


def fuse_sa_tail(device: torch.device) -> bool:
    """Whether inference copies run SA, residual add and ReLU as one chunked pass
    (:class:`models.InferenceSABottleneck`): on the CPU it is what makes SANet50's masked forwards
    cost about ResNet50's; on CUDA its chunk loop launches many small kernels, and the unfused
    folded SA was twice as fast (H200, torch 2.11: 0.4 vs 0.9 ms per image at batch 16,
    benchmarks/bench_analysis.py)."""
    return device.type == "cpu"


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

    key: str  # a registered model's key (weights.MODEL_SPECS): "resnet50", "sanet50", "seresnet50", ...
    display_name: str
    model: nn.Module
    weights: WeightsInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # From the weights description (Lab.load passes the spec's); None: ImageNet's names when the
    # model has 1000 outputs, else the indices.
    categories: Sequence[str] | None = None
    transform: EvalTransform = IMAGENET_EVAL  # the weights' evaluation preprocessing
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
        self._fast_model_mixed: nn.Module | None = None
        self._compiled: dict[str, nn.Module] = {}
        # Measured milliseconds per masked forward (one image) by precision, from the latest probe:
        # what the app's estimates for Score-CAM are made of.
        self.forward_ms: dict[str, float] = {}
        self._bf16_check: PrecisionCheck | None = None
        self.model.to(self.device).eval().requires_grad_(False)
        outputs = _output_count(self.model)
        if self.categories is None:
            self.categories = IMAGENET_CATEGORIES if outputs in (None, len(IMAGENET_CATEGORIES)) \
                else [str(i) for i in range(outputs)]
        elif outputs is not None and outputs != len(self.categories):
            raise ValueError(f"{self.display_name}: the model has {outputs} outputs but its weights "
                             f"describe {len(self.categories)} categories")
        self.categories = list(self.categories)
        self.sa_modules = models.sa_module_names(self.model)  # paper name -> module name
        # Its attention gates, if any: how to read them (SA, SE, ECA) and where (depth -> module).
        self.gate_layout = attention.layout_of(self.model)
        self.gate_modules = self.gate_layout.modules(self.model) if self.gate_layout else {}
        resolve_module(self.model, self.probe_layer)  # fail early on a wrong probe layer
        if self.fast_model is None and self.use_fast_model:
            self.fast_model = models.inference_copy(self.model, channels_last=True,
                                                    fuse_sa=fuse_sa_tail(self.device))
        if self.fast_model is not None:
            self.fast_model.to(self.device).eval().requires_grad_(False)

    @property
    def bf16_check(self) -> PrecisionCheck | None:
        """The first probe under ``auto`` precision compares bf16 with fp32 on its image; later
        probes follow the verdict (see probe_precision). Set and read holding ``lock``."""
        return self._bf16_check

    @bf16_check.setter
    def bf16_check(self, check: PrecisionCheck | None) -> None:
        self._bf16_check = check
        if check is not None and check.verdict != "bf16":  # free what auto will not use (~50 MB each)
            self._fast_model_bf16 = None  # an explicit bf16 probe makes it again (mixed keeps its layers)
            self._compiled.pop("bf16", None)
            if check.verdict == "fp32":
                self._fast_model_mixed = None
                self._compiled.pop("mixed", None)

    @property
    def probe_forward_model(self) -> nn.Module:
        return self.fast_model if self.fast_model is not None else self.model

    def probe_model_for(self, precision: str) -> nn.Module:
        """The model for masked forwards at ``precision``; call it holding ``lock``.

        bf16 uses a copy with bf16 weights (made on first use): autocast would cast every
        convolution's weights again on each forward. ``mixed`` runs the fp32 copy's stem, layer1
        and layer2 and the bf16 copy's layer3 and layer4 (models.MixedPrecisionResNet: shared
        modules, no further weights).
        """
        if precision not in {"bf16", "mixed"} or self.fast_model is None:
            model = self.probe_forward_model
        else:
            if self._fast_model_bf16 is None:
                self._fast_model_bf16 = copy.deepcopy(self.fast_model).to(torch.bfloat16)
            model = self._fast_model_bf16
            if precision == "mixed":
                if self._fast_model_mixed is None:
                    self._fast_model_mixed = models.MixedPrecisionResNet(self.fast_model, self._fast_model_bf16)
                model = self._fast_model_mixed
        if not self.compile_probe:
            return model
        if precision not in self._compiled:
            # Frozen weights let inductor fold them into its kernels; every batch has the same
            # shape except a last partial one, so no dynamic shapes.
            self._compiled[precision] = torch.compile(model, options={"freezing": True}, dynamic=False)
        return self._compiled[precision]

    def probe_precision(self, requested: str) -> str:
        """The precision of the next probe: ``fp32``, ``mixed``, ``bf16``, or ``check`` (run fp32
        and bf16, and mixed where bf16 fails; compare).

        An explicit fp32/mixed/bf16 is obeyed. ``auto`` is fp32 without native bf16; otherwise it
        is ``check`` until this model has a :class:`PrecisionCheck`, then its verdict.
        """
        if requested != "auto":
            return resolve_precision(requested, self.device)
        if resolve_precision("auto", self.device) == "fp32":
            return "fp32"
        if self.bf16_check is None:
            return "check"
        return self.bf16_check.verdict

    @property
    def has_sa(self) -> bool:
        return bool(self.sa_modules)

    @property
    def has_gates(self) -> bool:
        """Whether the model has attention gates the lab reads (SA, SE or ECA)."""
        return bool(self.gate_modules)

    @property
    def num_classes(self) -> int:
        return len(self.categories or ())

    def label(self, index: int) -> str:
        return self.categories[index] if self.categories and 0 <= index < len(self.categories) else str(index)

    def check_class(self, index: int) -> None:
        if not 0 <= index < self.num_classes:
            raise ValueError(f"target class {index} is not one of {self.display_name}'s classes "
                             f"0..{self.num_classes - 1}")

    def run_probe(self, x: Tensor, maps: Tensor, classes: Tensor, *, precision: str,
                  batch_size: int) -> tuple[Tensor, Tensor]:
        """Masked-forward scores and predictions (N, G) at ``precision`` (fp32/bf16); hold ``lock``."""
        return probe_scores(self.probe_model_for(precision), x, maps, classes, batch_size=batch_size,
                            precision=precision, channels_last=self.fast_model is not None)

    def probe_batch_ms(self, x: Tensor, maps: Tensor, precisions: Sequence[str], *,
                       batch_size: int) -> dict[str, float]:
        """Best-of-3 milliseconds of one batch of the probe's masked forwards at each precision,
        timed in turns (:func:`probes.best_interleaved_ms`): the speed rule's measure; hold ``lock``."""
        masks = probe_masks(maps[:1, :batch_size].to(x.device), tuple(x.shape[-2:]))[0]
        batch = x[:1] * masks.unsqueeze(1).to(x.dtype)
        channels_last = self.fast_model is not None
        runs = {p: functools.partial(forward_logits, self.probe_model_for(p), batch, precision=p,
                                     channels_last=channels_last) for p in precisions}
        return best_interleaved_ms(runs, device=self.device)


def load_model(key: str, explicit: str | None = None, *, device: torch.device, weights_dir: Path | None = None,
               require_pretrained: bool = False, compile_probe: bool = False,
               log: Callable[[str], None] | None = None) -> LoadedModel:
    """One registered model with its weights (:func:`weights.build_model`), ready to serve."""
    if key not in MODEL_SPECS:
        raise ValueError(f"unknown model {key!r}: choose from {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[key]
    start = time.perf_counter()
    model, info = build_model(spec, explicit, weights_dir=weights_dir, require_pretrained=require_pretrained)
    loaded = LoadedModel(key, spec.display_name, model, info, device, categories=spec.weights.categories,
                         transform=spec.weights.transforms, compile_probe=compile_probe)
    if log:
        state = "pretrained" if info.pretrained else f"UNTRAINED ({info.note})"
        log(f"{spec.display_name}: {state}; weights: {info.source}; on {device}; {time.perf_counter() - start:.1f} s")
    return loaded


def _output_count(model: nn.Module) -> int | None:
    fc = getattr(model, "fc", None)
    return int(fc.out_features) if isinstance(fc, nn.Linear) else None


class Lab:
    """The models one process serves, loaded once."""

    def __init__(self, loaded: Mapping[str, LoadedModel]) -> None:
        self.models: dict[str, LoadedModel] = dict(loaded)

    @classmethod
    def load(cls, *, models: Sequence[str] = DEFAULT_MODELS, specs: Mapping[str, str | None] | None = None,
             resnet50: str | None = None, sanet50: str | None = None, device: str = "auto",
             weights_dir: Path | None = None, require_pretrained: bool = False,
             compile_probe: bool = False, log: Callable[[str], None] | None = None) -> Lab:
        """Registered ``models`` (keys of :data:`weights.MODEL_SPECS`, in this order), each with
        its weights SPEC from ``specs`` (or the ``resnet50`` / ``sanet50`` shorthands) when given."""
        target = resolve_device(device)
        if compile_probe:
            check_compiler(target)
        explicit = {"resnet50": resnet50, "sanet50": sanet50, **(specs or {})}
        return cls({key: load_model(key, explicit.get(key), device=target, weights_dir=weights_dir,
                                    require_pretrained=require_pretrained, compile_probe=compile_probe, log=log)
                    for key in models})

    def subset(self, keys: Sequence[str]) -> Lab:
        """The same loaded models, only those named (in that order)."""
        return Lab({k: self.models[k] for k in keys})

    @property
    def device(self) -> torch.device:
        return next(iter(self.models.values())).device

    @property
    def transforms(self) -> list[EvalTransform]:
        """The models' evaluation preprocessing, each once, in model order (see :meth:`prepare`)."""
        return list(dict.fromkeys(lm.transform for lm in self.models.values()))

    @property
    def transform(self) -> EvalTransform:
        """The evaluation preprocessing every model here shares (one prepared tensor serves all)."""
        transforms = {lm.transform for lm in self.models.values()}
        if len(transforms) != 1:
            raise ValueError("the models were evaluated with different preprocessing; analyse them in "
                             "separate labs: " + ", ".join(f"{lm.display_name} {lm.transform}"
                                                           for lm in self.models.values()))
        return transforms.pop()

    @property
    def untrained(self) -> list[str]:
        """Display names of the models without pretrained weights."""
        return [lm.display_name for lm in self.models.values() if not lm.weights.pretrained]

    def prepare(self, source: ImageInput, *, limits: DecodeLimits = DEFAULT_LIMITS,
                name: str | None = None) -> PreparedImage:
        """Decode ``source`` and prepare it with each model's evaluation preprocessing (models
        whose preprocessing differs in interpolation or normalisation each get their own tensor
        of the same crop: :meth:`PreparedImage.tensor_for`)."""
        transforms = self.transforms
        return load_and_prepare(source, limits=limits, name=name,
                                transform=transforms[0] if len(transforms) == 1 else transforms)


