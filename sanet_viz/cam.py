"""Class activation maps through pytorch-grad-cam, with the model left as it was found.

Single-pass methods run pytorch-grad-cam on the model itself (:func:`compute_cam`). The two
multi-pass methods, Score-CAM and Ablation-CAM, have batched subclasses
(:class:`BatchedScoreCAM`, :class:`BatchedAblationCAM`) that override only ``get_cam_weights``:
they take the target layer's activations from one hooked forward that the caller made, and run
their thousands of forwards through a function the caller gives (an inference copy), in batches,
with progress and cancellation, without touching the shared model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import AblationCAM, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .hooks import HookOwner, ModelStateGuard, resolve_module
from .progress import ProgressFn, step

__all__ = ["CAM_METHODS", "SINGLE_PASS_METHODS", "MULTI_PASS_METHODS", "CLASS_AGNOSTIC_METHODS", "CamOutput",
           "GradientCut", "compute_cam", "BatchedScoreCAM", "BatchedAblationCAM", "ABLATION_VALUE_OFFSET"]

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
# One forward per channel of the target layer (2048 at layer4.2): minutes on a CPU.
MULTI_PASS_METHODS = frozenset(CAM_METHODS) - SINGLE_PASS_METHODS
# Methods whose map does not depend on the class asked for (EigenCAM: the first principal
# component of the activations).
CLASS_AGNOSTIC_METHODS = frozenset({"eigencam"})
# pytorch-grad-cam's AblationLayer: a channel is set to 0 when the layer's minimum is 0 (ReLU
# outputs), else to (minimum - 1e7).
ABLATION_VALUE_OFFSET = 1e7


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


class _ActivationCAM:
    """What the batched subclasses share: BaseCAM's template (``get_cam_image``, ReLU, scaling,
    aggregation) applied to activations the caller captured, instead of BaseCAM's own hooked
    forward of a model. They are not constructed through ``BaseCAM.__init__``, which would hook
    the (shared) model: they never see it."""

    def __init__(self, *, batch_size: int, progress: ProgressFn | None, device: torch.device) -> None:
        self.batch_size = batch_size
        self.progress = progress
        self.device = device

    def __del__(self) -> None:  # BaseCAM.__del__ releases hooks; these objects registered none
        pass

    def cam_from(self, input_tensor: Tensor, activations: Tensor, target_class: int) -> np.ndarray:
        """The (H, W) map in [0, 1] for one image, as ``BaseCAM.forward`` makes it."""
        if input_tensor.shape[0] != 1 or activations.shape[0] != 1:
            raise ValueError("one image at a time")
        acts = activations.detach().float().cpu().numpy()
        cam = self.get_cam_image(input_tensor, None, [ClassifierOutputTarget(target_class)], acts, None)  # type: ignore[attr-defined]
        scaled = scale_cam_image(np.maximum(cam, 0), self.get_target_width_height(input_tensor))  # type: ignore[attr-defined]
        return self.aggregate_multi_layers([scaled[:, None, :]])[0]  # type: ignore[attr-defined]


class BatchedScoreCAM(_ActivationCAM, ScoreCAM):
    """Score-CAM (Wang et al. 2020) exactly as pytorch-grad-cam computes it, batched.

    Channel k's activation map is upsampled bilinearly (align_corners=True), min-max normalised
    with pytorch-grad-cam's 1e-8, and masks the input; the channel's score is the target logit
    of the masked input, and the weights are the softmax of the scores over channels. Masks are
    made one batch at a time (pytorch-grad-cam materialises all of them: 1.2 GB at layer4.2), and
    channels whose upsampled map is constant (dead ReLU channels) all mask the input to zero, so
    their one shared forward is run once.

    ``forward(batch)`` returns the logits of a batch of masked inputs: an inference copy, in the
    precision the caller allows.
    """

    def __init__(self, forward: Callable[[Tensor], Tensor], *, batch_size: int = 32,
                 progress: ProgressFn | None = None, device: torch.device | None = None) -> None:
        super().__init__(batch_size=batch_size, progress=progress, device=device or torch.device("cpu"))
        self.forward_fn = forward

    @torch.no_grad()
    def get_cam_weights(self, input_tensor: Tensor, target_layer: Any, targets: list[Any],
                        activations: np.ndarray, grads: Any) -> np.ndarray:
        if len(targets) != 1 or activations.shape[0] != 1:
            raise ValueError("one image at a time")
        category = int(targets[0].category)
        acts = torch.from_numpy(activations).to(self.device)
        size = tuple(input_tensor.shape[-2:])
        channels = acts.shape[1]

        def masks(index: Tensor) -> Tensor:
            up = F.interpolate(acts[:, index], size=size, mode="bilinear", align_corners=True)[0]
            flat = up.reshape(len(index), -1)
            lo, hi = flat.min(-1)[0][:, None, None], flat.max(-1)[0][:, None, None]
            return (up - lo) / (hi - lo + 1e-8)

        constant = torch.zeros(channels, dtype=torch.bool, device=self.device)
        for index in torch.arange(channels, device=self.device).split(256):
            up = F.interpolate(acts[:, index], size=size, mode="bilinear", align_corners=True)[0]
            flat = up.reshape(len(index), -1)
            constant[index] = flat.min(-1)[0] == flat.max(-1)[0]
        varying = torch.nonzero(~constant).flatten()
        scores = torch.empty(channels, dtype=torch.float32)
        x = input_tensor.to(self.device)
        total = len(varying) + int(constant.any())
        if constant.any():  # every constant map masks the input to zero: one forward serves them all
            scores[constant.cpu()] = float(self.forward_fn(torch.zeros_like(x))[0, category])
        done = int(constant.any())
        for index in varying.split(self.batch_size):
            logits = self.forward_fn(x * masks(index)[:, None])
            scores[index.cpu()] = logits[:, category].float().cpu()
            done += len(index)
            step(self.progress, done, total, "Score-CAM masked forwards")
        return torch.softmax(scores.view(1, channels), dim=-1).numpy()


class BatchedAblationCAM(_ActivationCAM, AblationCAM):
    """Ablation-CAM (Desai & Ramaswamy 2020) as pytorch-grad-cam computes it, from the target layer on.

    pytorch-grad-cam runs the whole network for every ablated channel; only the layers after the
    target layer see the ablation, so this runs ``tail`` (those layers: e.g. pooling and the
    classifier after layer4.2, see :func:`models.tail_after`) on the captured activations with
    one channel ablated per batch row. Weights are (original - ablated) / original target logits.
    Only for layers whose minimum is 0 (ReLU outputs, every bottleneck's output): elsewhere
    pytorch-grad-cam's ablation value depends on its batch order, and :func:`compute_cam` is used.
    """

    def __init__(self, tail: Callable[[Tensor], Tensor], *, batch_size: int = 64,
                 progress: ProgressFn | None = None, device: torch.device | None = None) -> None:
        super().__init__(batch_size=batch_size, progress=progress, device=device or torch.device("cpu"))
        self.tail = tail

    @staticmethod
    def applies_to(activations: Tensor) -> bool:
        return bool(activations.min() == 0)

    @torch.no_grad()
    def get_cam_weights(self, input_tensor: Tensor, target_layer: Any, targets: list[Any],
                        activations: np.ndarray, grads: Any) -> np.ndarray:
        if len(targets) != 1 or activations.shape[0] != 1:
            raise ValueError("one image at a time")
        acts = torch.from_numpy(activations).to(self.device)
        if not self.applies_to(acts):
            raise ValueError("BatchedAblationCAM needs a layer whose minimum is 0 (a ReLU output)")
        category = int(targets[0].category)
        original = float(np.float32(self.tail(acts)[0, category].float().cpu()))
        channels = acts.shape[1]
        ablated = np.empty(channels, dtype=np.float32)
        for index in torch.arange(channels).split(self.batch_size):
            batch = acts.repeat(len(index), 1, 1, 1)
            batch[torch.arange(len(index)), index.to(self.device)] = 0.0
            ablated[index.numpy()] = self.tail(batch)[:, category].float().cpu().numpy()
            step(self.progress, int(index[-1]) + 1, channels, "Ablation-CAM ablated channels")
        return ((original - ablated) / original)[None, :]
