"""What an analysis is asked (:class:`AnalysisOptions`) and what it returns: per model,
predictions, the CAM, group maps, probe and SA gates; and ``to_dict``, the result.json contract
that other tools rely on (see the README)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from . import models
from .attention import GateProfile
from .cam import CAM_METHODS, CLASS_AGNOSTIC_METHODS
from .probes import GroupProbe, PrecisionCheck
from .weights import IMAGENET_CATEGORIES, WeightsInfo, untrained_warning

if TYPE_CHECKING:
    from .faithfulness import Faithfulness

__all__ = ["AnalysisOptions", "Prediction", "ModelResult", "AnalysisResult"]


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
    # Classes of the models it runs on (their weights' categories); each model checks again.
    num_classes: int = len(IMAGENET_CATEGORIES)
    # Deletion, insertion and ROAD of each model's CAM (sanet_viz.faithfulness): 2(S + 1) + 8
    # forwards per model; the randomisation cascade costs one CAM per block on top.
    faithfulness: bool = False
    faithfulness_steps: int = 32
    faithfulness_randomization: bool = False

    def __post_init__(self) -> None:
        if self.method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {self.method!r}; choose from {', '.join(CAM_METHODS)}")
        if self.target_class is not None and not 0 <= self.target_class < self.num_classes:
            raise ValueError(f"target class must be one of the models' {self.num_classes} classes "
                             f"0..{self.num_classes - 1}, got {self.target_class}")
        if self.precision not in {"auto", "fp32", "mixed", "bf16"}:
            raise ValueError(f"precision must be auto, fp32, mixed or bf16, got {self.precision!r}")
        if self.probe_batch_size < 1:
            raise ValueError("probe batch size must be at least 1")
        if self.faithfulness_steps < 1:
            raise ValueError(f"faithfulness steps must be at least 1, got {self.faithfulness_steps}")


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
    target_label: str  # the class's name in the model's categories
    cam: np.ndarray | None  # (H, W) float32 in [0, 1]; None while a multi-pass CAM is pending
    cam_method: str
    cam_layer: str
    group_maps: np.ndarray  # (G, h, w) raw channel means of the probe layer's chunks
    probe: GroupProbe | None
    sa_gates: dict[str, dict[str, np.ndarray]] | None  # SA models: paper name -> channel/spatial (G,)
    sa_spatial_maps: np.ndarray | None  # (G, h, w) spatial gate maps of SA_5_3
    precision: str
    timings_ms: dict[str, float]
    logits: np.ndarray  # (num_classes,) fp32 of the unmasked image
    precision_check: PrecisionCheck | None = None  # the model's bf16 check, once there is one
    # The CAM layer's activations while a multi-pass CAM is pending (analysis.complete_cam).
    pending_cam: Tensor | None = field(default=None, repr=False)
    # Every attention model's gates (SA, SE, ECA) with what they are; for SA the same values as sa_gates.
    gates: GateProfile | None = None

    @property
    def class_agnostic(self) -> bool:
        """True when the map ignores the class asked for (EigenCAM)."""
        return self.cam_method in CLASS_AGNOSTIC_METHODS
    faithfulness: Faithfulness | None = None  # when asked (AnalysisOptions.faithfulness)

    def to_dict(self, cam_file: str | None = None) -> dict[str, Any]:
        layer_name = self.cam_layer
        with_paper = models.paper_name_or_none(layer_name)
        out: dict[str, Any] = {
            "display_name": self.display_name,
            "weights": self.weights.to_dict(),
            "pretrained": self.weights.pretrained,
            "top5": [p.to_dict() for p in self.top5],
            "target_class": self.target_class,
            "target_label": self.target_label,
            "cam": {"method": self.cam_method, "layer": layer_name, "paper_name": with_paper,
                    "class_agnostic": self.class_agnostic, "file": cam_file},
            "group_probe": self.probe.to_dict() if self.probe else None,
            "probe_precision": self.precision,
            "bf16_check": self.precision_check.to_dict() if self.precision_check else None,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }
        if self.faithfulness is not None:
            out["faithfulness"] = self.faithfulness.to_dict()
        if self.sa_gates is not None:
            out["sa_gates"] = {name: {"channel": g["channel"].tolist(), "spatial": g["spatial"].tolist()}
                               for name, g in self.sa_gates.items()}
        if self.gates is not None:
            out["gates"] = self.gates.to_dict()
        return out


@dataclass
class AnalysisResult:
    image_name: str
    display: np.ndarray  # (224, 224, 3) uint8 crop the models saw
    original_size: tuple[int, int]
    models: dict[str, ModelResult]
    options: AnalysisOptions
    timings_ms: dict[str, float]
    # The whole picture (small) and the crop's box in it, to show maps in place (PreparedImage's).
    preview: np.ndarray | None = field(default=None, repr=False)
    crop_box: tuple[float, float, float, float] | None = None

    @property
    def all_pretrained(self) -> bool:
        return all(m.weights.pretrained for m in self.models.values())

    @property
    def untrained(self) -> list[str]:
        """Display names of the models that ran without pretrained weights."""
        return [m.display_name for m in self.models.values() if not m.weights.pretrained]

    def to_dict(self, cam_files: Mapping[str, str] | None = None) -> dict[str, Any]:
        cam_files = cam_files or {}
        return {
            "image": self.image_name,
            "original_size": list(self.original_size),
            "pretrained": self.all_pretrained,
            "warning": None if self.all_pretrained else untrained_warning(self.untrained),
            "options": {"method": self.options.method, "target_class": self.options.target_class,
                        "cam_layer": self.options.cam_layer, "precision": self.options.precision},
            "models": {k: m.to_dict(cam_files.get(k)) for k, m in self.models.items()},
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }
