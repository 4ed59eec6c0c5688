"""compute_cam against pytorch-grad-cam called directly, and the model left as it was found."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_sa_resnet
from pytorch_grad_cam import AblationCAM, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from sanet_viz import models
from sanet_viz.cam import compute_cam

SIZE = 64
# The library's classes, named here independently of sanet_viz.cam's table.
LIBRARY = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
           "hirescam": HiResCAM, "eigencam": EigenCAM, "scorecam": ScoreCAM, "ablationcam": AblationCAM}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> models.SAResNet:
    """Frozen and in eval mode, as the engine keeps its models."""
    return tiny_sa_resnet(seed=5).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def direct(model: nn.Module, layer: str, x: Tensor, method: str, target: int | None) -> np.ndarray:
    """pytorch-grad-cam as its README calls it, on a trainable copy of the model."""
    reference = copy.deepcopy(model).eval().requires_grad_(True)
    targets = None if target is None else [ClassifierOutputTarget(target)]
    with LIBRARY[method](model=reference, target_layers=[reference.get_submodule(layer)]) as cam:
        if method == "scorecam":
            cam.batch_size = 32
        return cam(input_tensor=x.clone(), targets=targets)[0]


def hooks_left(model: nn.Module) -> list[str]:
    return [f"{name or '<root>'}.{attr}" for name, m in model.named_modules() for attr in HOOK_DICTS
            if getattr(m, attr, None)]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"])
@pytest.mark.parametrize("target", [None, 7])
def test_compute_cam_equals_library(method: str, target: int | None, tiny: models.SAResNet, x: Tensor) -> None:
    want = direct(tiny, "layer4.0", x, method, target)
    out = compute_cam(tiny, x, method=method, layer="layer4.0", target_class=target)
    assert out.cam.shape == (SIZE, SIZE) and out.cam.dtype == np.float32
    assert out.cam.min() >= 0 and out.cam.max() <= 1
    np.testing.assert_allclose(out.cam, want, atol=1e-5)
    with torch.no_grad():
        logits = tiny(x)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    assert out.target_class == (int(logits.argmax()) if target is None else target)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_multi_pass_methods_equal_library(method: str, tiny: models.SAResNet, x: Tensor) -> None:
    want = direct(tiny, "layer4.0", x, method, None)
    before = [name for name, _ in tiny.named_modules()]
    out = compute_cam(tiny, x, method=method, layer="layer4.0")
    np.testing.assert_allclose(out.cam, want, atol=1e-5)
    assert [name for name, _ in tiny.named_modules()] == before  # AblationCAM swaps the layer back
    assert isinstance(tiny.layer4[0], models.SABottleneck)
    assert hooks_left(tiny) == []


@pytest.mark.parametrize(("layer", "module"), [("SA_5_1", "layer4.0"), ("layer3.0", "layer3.0"),
                                               ("layer4.0.sa", "layer4.0.sa")])
def test_other_layers_and_paper_names(layer: str, module: str, tiny: models.SAResNet, x: Tensor) -> None:
    want = direct(tiny, module, x, "gradcam", 2)
    np.testing.assert_allclose(compute_cam(tiny, x, layer=layer, target_class=2).cam, want, atol=1e-5)


def test_cams_differ_between_classes(tiny: models.SAResNet, x: Tensor) -> None:
    """Guard: the comparison above would be weak if the CAM ignored the target."""
    a = compute_cam(tiny, x, layer="layer4.0", target_class=1).cam
    b = compute_cam(tiny, x, layer="layer4.0", target_class=8).cam
    assert np.abs(a - b).max() > 1e-2


def test_full_size_sanet50_gradcam_equals_library(sanet50_random: models.SAResNet) -> None:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    want = direct(sanet50_random, "layer4.2", x, "gradcam", None)
    out = compute_cam(sanet50_random, x)  # defaults: Grad-CAM at layer4.2 = SA_5_3, top-1
    assert out.cam.shape == (224, 224)
    np.testing.assert_allclose(out.cam, want, atol=1e-5)
    assert np.corrcoef(out.cam.ravel(), want.ravel())[0, 1] >= 0.99
    assert hooks_left(sanet50_random) == []
    assert all(p.grad is None and not p.requires_grad for p in sanet50_random.parameters())



def test_backward_starts_at_the_target_layer(tiny: models.SAResNet, x: Tensor) -> None:
    """The gradient cut: nothing before the target layer is part of the autograd graph."""
    seen: dict[str, bool] = {}
    handles = [tiny.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, o.requires_grad)) for name in ("layer1", "layer3")]
    try:
        compute_cam(tiny, x, layer="layer4.0", target_class=3)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"layer1": False, "layer3": False}


@pytest.mark.parametrize("layer", ["layer4.0", "layer4.0.bn3", "layer3.0.conv2"])
def test_torchvision_blocks_with_in_place_adds_equal_library(layer: str, x: Tensor) -> None:
    """torchvision's Bottleneck adds the identity in place onto bn3's output: the cut's clone
    keeps that legal and the CAM equal to the library's."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(4)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval().requires_grad_(False)
    for method in ("gradcam", "gradcam++"):
        want = direct(model, layer, x, method, 5)
        np.testing.assert_allclose(compute_cam(model, x, method=method, layer=layer, target_class=5).cam,
                                   want, atol=1e-5)
    assert hooks_left(model) == []


# ------------------------------------------------------------------------------------------
# The model is left as it was found


def state_of(model: nn.Module) -> dict[str, object]:
    return {
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(model: nn.Module, before: dict[str, object]) -> None:
    after = state_of(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["tensors"].items():  # type: ignore[union-attr]
        assert torch.equal(after["tensors"][k], v), k  # type: ignore[index]
    assert hooks_left(model) == []
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_frozen_eval_model_unchanged(method: str, x: Tensor) -> None:
    model = tiny_sa_resnet(seed=1).eval().requires_grad_(False)
    before = state_of(model)
    x_before = x.clone()
    compute_cam(model, x, method=method, layer="layer4.0")
    assert_same_state(model, before)
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


def test_trainable_model_gets_no_grad_and_keeps_flags(x: Tensor) -> None:
    model = tiny_sa_resnet(seed=2).eval()
    model.layer1.requires_grad_(False)  # mixed flags
    before = state_of(model)
    assert any(p.requires_grad for p in model.parameters())
    compute_cam(model, x, layer="layer4.0")
    assert_same_state(model, before)


def test_existing_grads_are_kept(x: Tensor) -> None:
    model = tiny_sa_resnet(seed=2).eval()
    marker = torch.full_like(model.fc.weight, 0.5)
    model.fc.weight.grad = marker.clone()
    compute_cam(model, x, layer="layer4.0")
    assert model.fc.weight.grad is not None and torch.equal(model.fc.weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")


def test_train_mode_model_is_restored_and_its_statistics_untouched(x: Tensor) -> None:
    model = tiny_sa_resnet(seed=3).train()
    before = state_of(model)
    out = compute_cam(model, x, layer="layer4.0")
    assert_same_state(model, before)  # includes BatchNorm running statistics
    # The CAM itself is computed in eval mode, as pytorch-grad-cam does.
    np.testing.assert_allclose(out.cam, direct(model.eval(), "layer4.0", x, "gradcam", None), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Errors


def test_unknown_method(tiny: models.SAResNet, x: Tensor) -> None:
    with pytest.raises(ValueError, match="nosuchcam"):
        compute_cam(tiny, x, method="nosuchcam")
    assert hooks_left(tiny) == []


def test_unknown_layer(tiny: models.SAResNet, x: Tensor) -> None:
    with pytest.raises(ValueError, match="layer9.9"):
        compute_cam(tiny, x, layer="layer9.9")
    with pytest.raises(ValueError, match="SA_5_9"):
        compute_cam(tiny, x, layer="SA_5_9")


def test_one_image_only(tiny: models.SAResNet) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 64, 64\)"):
        compute_cam(tiny, torch.randn(2, 3, 64, 64))


def test_target_class_out_of_range_raises_and_releases_hooks(tiny: models.SAResNet, x: Tensor) -> None:
    with pytest.raises((IndexError, ValueError)):
        compute_cam(tiny, x, layer="layer4.0", target_class=10)  # the tiny model has 10 classes
    assert hooks_left(tiny) == []
    assert all(p.grad is None for p in tiny.parameters())
