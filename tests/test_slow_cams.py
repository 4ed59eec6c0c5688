"""Score-CAM and Ablation-CAM through the batched fast path equal pytorch-grad-cam in fp32, leave
the shared model alone, report progress, stop when cancelled, and do not hold the model's lock."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_sa_resnet
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from sanet_viz import models
from sanet_viz.analysis import AnalysisOptions, complete_cam, explain_model
from sanet_viz.cam import BatchedAblationCAM, BatchedScoreCAM
from sanet_viz.lab import LoadedModel
from sanet_viz.preprocessing import PreparedImage
from sanet_viz.progress import Cancelled
from sanet_viz.weights import WeightsInfo

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> models.SAResNet:
    return tiny_sa_resnet(seed=5).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def image() -> PreparedImage:
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    return PreparedImage(x, np.zeros((SIZE, SIZE, 3), np.uint8), (SIZE, SIZE))


def library(method: str, model: nn.Module, layer: str, x: Tensor, target: int) -> np.ndarray:
    """pytorch-grad-cam as its README calls it, on a copy of the model."""
    reference = copy.deepcopy(model).eval().requires_grad_(True)
    cls = {"scorecam": ScoreCAM, "ablationcam": AblationCAM}[method]
    with cls(model=reference, target_layers=[reference.get_submodule(layer)]) as cam:
        cam.batch_size = 32
        return cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(target)])[0]


def activations(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    out: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out[0]


@pytest.mark.parametrize("layer", ["layer4.0", "layer3.0"])
def test_batched_score_cam_equals_pytorch_grad_cam_exactly_on_the_same_model(tiny: models.SAResNet,
                                                                             image: PreparedImage, layer: str) -> None:
    x, target = image.tensor, 3
    acts = activations(tiny, layer, x)
    assert bool((acts.flatten(2).amax(-1) == acts.flatten(2).amin(-1)).any()), "want dead channels in the test"
    ours = BatchedScoreCAM(lambda b: tiny(b), batch_size=7).cam_from(x, acts, target)
    np.testing.assert_allclose(ours, library("scorecam", tiny, layer, x, target), rtol=0, atol=1e-6)


def test_batched_ablation_cam_equals_pytorch_grad_cam(tiny: models.SAResNet, image: PreparedImage) -> None:
    x, target, layer = image.tensor, 2, "layer3.0"
    acts = activations(tiny, layer, x)
    assert BatchedAblationCAM.applies_to(acts)
    tail = models.tail_after(tiny, layer)
    ours = BatchedAblationCAM(tail, batch_size=5).cam_from(x, acts, target)
    np.testing.assert_allclose(ours, library("ablationcam", tiny, layer, x, target), rtol=0, atol=1e-5)


def test_tail_after_continues_the_forward(tiny: models.SAResNet, image: PreparedImage) -> None:
    for block in models.bottleneck_names(tiny):
        with torch.no_grad():
            logits = models.tail_after(tiny, block)(activations(tiny, block, image.tensor))
            torch.testing.assert_close(logits, tiny(image.tensor), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a bottleneck"):
        models.tail_after(tiny, "layer4.0.bn3")


def test_tail_of_an_inference_copy_takes_the_reference_models_features(tiny: models.SAResNet,
                                                                      image: PreparedImage) -> None:
    fast = models.inference_copy(tiny, channels_last=False)
    permuted = [n for n, m in fast.named_modules() if hasattr(m, "stream_order")
                and not torch.equal(m.stream_order, torch.arange(len(m.stream_order)))]
    assert permuted, "the copy keeps some residual stream permuted: the case under test"
    for block in models.bottleneck_names(tiny):
        with torch.no_grad():
            logits = models.tail_after(fast, block, reference_order=True)(activations(tiny, block, image.tensor))
            torch.testing.assert_close(logits, tiny(image.tensor), rtol=0, atol=1e-4)


def loaded(model: nn.Module) -> LoadedModel:
    return LoadedModel("sanet50", "Tiny SANet", model, WeightsInfo("untrained (test)", False),
                       probe_layer="layer4.0", probe_groups=4)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_engine_slow_cams_equal_pytorch_grad_cam_in_fp32(method: str, image: PreparedImage) -> None:
    """Through the inference copy (BN fused, shuffle folded): equal up to float rounding."""
    model = tiny_sa_resnet(seed=5).eval().requires_grad_(False)
    lm = loaded(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = AnalysisOptions(method=method, precision="fp32", target_class=4, cam_layer="layer4.0", num_classes=10)
    seen: list[tuple[int, int]] = []
    result = explain_model(lm, image, options, progress=lambda done, total, what: seen.append((done, total)))
    assert result.pending_cam is None and result.cam is not None
    np.testing.assert_allclose(result.cam, library(method, model, "layer4.0", image.tensor, 4), rtol=0, atol=2e-4)
    assert seen and seen[-1][0] == seen[-1][1], "progress reaches its total"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules()) and not lm.lock.locked()


def test_deferred_slow_cam_runs_without_the_lock_and_can_be_cancelled(image: PreparedImage) -> None:
    lm = loaded(tiny_sa_resnet(seed=5).eval().requires_grad_(False))
    options = AnalysisOptions(method="scorecam", precision="fp32", num_classes=10)
    result = explain_model(lm, image, options, defer_slow=True)
    assert result.cam is None and result.pending_cam is not None and result.target_class == int(result.logits.argmax())
    assert result.to_dict()["cam"]["class_agnostic"] is False

    lock_free: list[bool] = []

    def check_lock(done: int, total: int, what: str) -> None:
        # Another thread can take the model's lock while the slow CAM runs.
        got = lm.lock.acquire(timeout=1)
        lock_free.append(got)
        if got:
            lm.lock.release()
        if done >= 2:
            raise Cancelled("a newer request")

    worker_error: list[BaseException] = []

    def work() -> None:
        try:
            complete_cam(lm, image, result, options, progress=check_lock)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            worker_error.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert lock_free and all(lock_free)
    assert len(worker_error) == 1 and isinstance(worker_error[0], Cancelled)
    assert result.cam is None and result.pending_cam is not None, "a cancelled CAM stays pending"
