"""Class activation maps through pytorch-grad-cam, with the model left as it was found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import AblationCAM, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .hooks import HookOwner, ModelStateGuard, resolve_module

__all__ = ["CAM_METHODS", "SINGLE_PASS_METHODS", "CamOutput", "GradientCut", "compute_cam"]

# Name -> (class, human label). Names are the CLI's --method values.
CAM_METHODS: dict[str, tuple[type[BaseCAM], str]] = {
    "gradcam": (GradCAM, "Grad-CAM"),
    "gradcam++": (GradCAMPlusPlus, "Grad-CAM++"),
    "xgradcam": (XGradCAM, "XGrad-CAM"),
    "layercam": (LayerCAM, "LayerCAM"),
    "hirescam": (HiResCAM, "HiResCAM"),
    "eigencam": (EigenCAM, "EigenCAM"),
    "scorecam": (ScoreCAM, "Score-CAM (slow: one forward per channel)"),
    "ablationcam": (AblationCAM, "Ablation-CAM (slow: one forward per channel)"),
}
# Methods that run exactly one forward pass: its logits and hooked features can be reused.
SINGLE_PASS_METHODS = frozenset({"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"})


class GradientCut(HookOwner):
    """Replaces a module's output by a detached copy that requires grad.

    Gradients then start at that module: the forward before it builds no graph and the backward
    stops there. The copy is a clone of a leaf, so later in-place ops (torchvision's
    ``out += identity``) act on a graph node, as they did on the original output.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._register(module, self._cut)

    @staticmethod
    def _cut(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # e.g. Score-CAM's no-grad masked forwards
            return output
        return output.detach().requires_grad_(True).clone()

    def __enter__(self) -> GradientCut:
        return self


@dataclass(frozen=True)
class CamOutput:
    cam: np.ndarray  # (H, W) float32 in [0, 1], at the input size
    logits: Tensor  # (1, num_classes) from the CAM's own forward pass (fp32, detached)
    target_class: int


def compute_cam(model: nn.Module, x: Tensor, *, method: str = "gradcam", layer: str = "layer4.2",
                target_class: int | None = None, batch_size: int = 32) -> CamOutput:
    """One CAM for one image ``x`` (1, 3, H, W); ``target_class`` None explains the top-1 class.

    Parameters stay frozen and the input does not require grad: the target layer's output is
    cut from the graph and made a fresh tensor that requires grad (:class:`GradientCut`), so the
    backward pass runs only through the layers after it (for layer4.2: pooling and fc) instead of
    the whole network. Every CAM method reads only the target layer's activations and their
    gradients, which this leaves unchanged. Hooks are removed on return.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    cls, _ = CAM_METHODS[method]
    target_layer = resolve_module(model, layer)
    kwargs = {"batch_size": batch_size} if cls is AblationCAM else {}
    x = x.detach().float()
    targets = None if target_class is None else [ClassifierOutputTarget(target_class)]
    # BaseCAM puts the model in eval mode and zero_grad()s it, then backward() fills the .grad of
    # any trainable parameter: the guard puts them back. BaseCAM's own context manager would also
    # swallow an IndexError (e.g. a class index past the model's outputs), so release by hand.
    # The cut is registered first, so pytorch-grad-cam's hooks see (and hook) its output.
    with ModelStateGuard(model), GradientCut(target_layer):
        cam = cls(model=model, target_layers=[target_layer], **kwargs)
        try:
            if cls is ScoreCAM:
                cam.batch_size = batch_size
            with torch.enable_grad():
                grayscale = cam(input_tensor=x, targets=targets)
            # BaseCAM keeps the logits of its first forward, the unmodified input, for every method.
            logits = cam.outputs.detach().float()
        finally:
            cam.activations_and_grads.release()
    target = int(logits.argmax(-1)) if target_class is None else target_class
    return CamOutput(np.asarray(grayscale[0], dtype=np.float32), logits, target)
