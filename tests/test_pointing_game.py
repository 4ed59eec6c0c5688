"""A pointing game on data the test makes: does Grad-CAM (and the group probe) find the object?

A small SA-ResNet (the same SA layer, fewer and narrower blocks) learns for about a minute on
the CPU to name the colour of the one square in a noisy picture. On held-out pictures, Grad-CAM's
peak must land on the square, and masking the input with the group maps that cover the square
must keep the class better than masking it with those that don't.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanet_viz.cam import compute_cam
from sanet_viz.hooks import FeatureCapture
from sanet_viz.models import SAResNet
from sanet_viz.probes import group_maps, masked_scores, probe_masks

SIZE = 128
OBJECT = 32
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise pictures with one coloured square each: (images, labels, boxes as y0, x0)."""
    # Background clutter of random strength: masking the background away stays in distribution.
    strength = torch.rand(n, 1, 1, 1, generator=generator) * 0.8
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator) * strength
    labels = torch.randint(0, len(COLOURS), (n,), generator=generator)
    corners = torch.randint(0, SIZE - OBJECT + 1, (n, 2), generator=generator)
    for i in range(n):
        y, x = corners[i].tolist()
        images[i, :, y:y + OBJECT, x:x + OBJECT] = COLOURS[labels[i]].view(3, 1, 1) * 1.5
    return images, labels, corners


@pytest.fixture(scope="module")
def trained() -> SAResNet:
    torch.manual_seed(0)
    model = SAResNet([1, 1, 1, 1], num_classes=len(COLOURS), sa_groups=4, planes=(8, 16, 32, 64))
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    start, step, recent = time.monotonic(), 0, []
    # Stop once it has clearly learnt the task (or after the time budget).
    while time.monotonic() - start < 90 and (step < 60 or np.mean(recent[-20:]) < 0.99):
        images, labels, _ = make_batch(32, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            recent.append(float((model(images).argmax(-1) == labels).float().mean()) if step % 5 == 0
                          else recent[-1] if recent else 0.0)
        step += 1
    return model.eval().requires_grad_(False)


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
