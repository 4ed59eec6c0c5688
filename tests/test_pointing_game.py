"""A pointing game on data the test makes: does Grad-CAM (and the group probe) find the object?

A small SA-ResNet (the same SA layer, fewer and narrower blocks) learns for about a minute on
the CPU to name the colour of the one square in a noisy picture. On held-out pictures, Grad-CAM's
peak must land on the square, and masking the input with the group maps that cover the square
must keep the class better than masking it with those that don't.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import OBJECT, SIZE, make_batch

from sanet_viz.cam import compute_cam
from sanet_viz.hooks import FeatureCapture
from sanet_viz.models import SAResNet
from sanet_viz.probes import group_maps, masked_scores, probe_masks


@pytest.fixture(scope="module")
def trained(pointing_model: SAResNet) -> SAResNet:
    """The small SA-ResNet trained once per session (conftest.pointing_model)."""
    return pointing_model


@pytest.mark.slow
def test_grad_cam_points_at_the_object_and_covering_groups_keep_the_class(trained: SAResNet) -> None:
    generator = torch.Generator().manual_seed(1234)  # held-out: a different stream
    images, labels, corners = make_batch(40, generator)
    with torch.no_grad():
        accuracy = float((trained(images).argmax(-1) == labels).float().mean())
    assert accuracy >= 0.9, f"the small model did not learn the task (held-out accuracy {accuracy:.2f})"

    hits = 0
    covering_scores: list[float] = []
    other_scores: list[float] = []
    for i in range(len(images)):
        x = images[i:i + 1]
        y0, x0 = corners[i].tolist()
        cam = compute_cam(trained, x, method="gradcam", layer="layer3.0", target_class=int(labels[i])).cam
        py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
        tolerance = 8  # pixels: the CAM grid is 8x8 (layer3, stride 16) upsampled to 128x128
        hits += (y0 - tolerance <= py < y0 + OBJECT + tolerance) and (x0 - tolerance <= px < x0 + OBJECT + tolerance)

        with torch.no_grad(), FeatureCapture(trained, ["layer4.0"]) as capture:
            predicted = int(trained(x).argmax(-1))
        masks = probe_masks(group_maps(capture.outputs["layer4.0"], 64), (SIZE, SIZE))
        scores, _ = masked_scores(trained, x, masks, torch.tensor([predicted]), batch_size=32)
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[y0:y0 + OBJECT, x0:x0 + OBJECT] = True
        # Share of each group's mask that lies on the square; compare the top and bottom quarters.
        on_object = masks[0][:, inside].sum(-1) / masks[0].sum((-2, -1)).clamp_min(1e-6)
        order = torch.argsort(on_object)
        covering_scores.append(float(scores[0, order[-16:]].mean()))
        other_scores.append(float(scores[0, order[:16]].mean()))

    assert hits / len(images) >= 0.9, f"Grad-CAM's peak on the object in only {hits}/{len(images)} images"
    assert np.mean(covering_scores) > np.mean(other_scores) + 0.05, (np.mean(covering_scores), np.mean(other_scores))
    wins = np.mean(np.array(covering_scores) > np.array(other_scores))
    assert wins >= 0.8, f"covering groups beat the others in only {wins:.0%} of images"


@pytest.mark.slow
def test_bf16_probe_on_the_inference_copy_matches_fp32(trained: SAResNet) -> None:
    """The fast path (shuffle folded, BN fused, channels_last, bf16) keeps the probe's numbers."""
    from scipy.stats import spearmanr

    from sanet_viz.lab import LoadedModel
    from sanet_viz.weights import WeightsInfo

    lm = LoadedModel("sanet50", "small SA-ResNet", trained, WeightsInfo("trained in the test", True),
                     probe_layer="layer4.0")
    fast, fast_bf16 = lm.probe_model_for("fp32"), lm.probe_model_for("bf16")
    assert next(fast_bf16.parameters()).dtype == torch.bfloat16
    images, _, _ = make_batch(8, torch.Generator().manual_seed(99))
    with torch.no_grad(), FeatureCapture(trained, ["layer4.0"]) as capture:
        predicted = trained(images).argmax(-1)
    masks = probe_masks(group_maps(capture.outputs["layer4.0"], 64), (SIZE, SIZE))
    exact, _ = masked_scores(trained, images, masks, predicted, batch_size=64)
    fast_fp32, _ = masked_scores(fast, images, masks, predicted, batch_size=64, channels_last=True)
    fast_bf16, _ = masked_scores(fast_bf16, images, masks, predicted, batch_size=64, channels_last=True,
                                 precision="bf16")
    autocast_bf16, _ = masked_scores(fast, images, masks, predicted, batch_size=64, channels_last=True,
                                     precision="bf16")
    assert (autocast_bf16 - exact).abs().max() <= 0.02
    assert torch.allclose(fast_fp32, exact, atol=1e-4)
    assert (fast_bf16 - exact).abs().max() <= 0.02
    for a, b in zip(exact, fast_bf16, strict=True):
        assert spearmanr(a.numpy(), b.numpy()).statistic >= 0.95
