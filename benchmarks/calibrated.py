"""Random weights whose statistics look trained, for benchmarks and tests: :func:`calibrate`.

Untrained weights mislead a benchmark of the probe: an untrained ResNet50's logits reach ~50, its
softmax saturates, and bf16's error on the probe scores is then a property of the saturation, not
of the network. Pretrained weights cannot be downloaded here. ``calibrate`` keeps the random
convolutions but gives the network the statistics a trained one has:

- every BatchNorm's running mean and variance are those of its input on a batch of real images
  (the examples' crops and augmentations, :func:`example_batch`), set in depth order, so each
  layer normalises what it will actually see;
- SA layers get random gate parameters (the paper's 0/1 initialisation makes every gate
  ``sigmoid(1)``, a constant that hides errors);
- the classifier is scaled so that the logits' standard deviation over the classes, averaged over
  the batch, is ``logit_spread`` (3 by default): the top class then has a softmax of about 0.1-0.3,
  like a trained model on an ordinary image, not 1.0.

These are NOT trained weights: results computed with them are labelled "calibrated random
weights" and must never be read as findings about the published models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor, nn

__all__ = ["EXAMPLES", "CALIBRATED_SOURCE", "example_batch", "calibrate"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CALIBRATED_SOURCE = "calibrated random weights (BatchNorm statistics from example images; not trained)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def example_batch(size: int = 224, *, per_image: int = 8, seed: int = 0,
                  paths: Sequence[Path] | None = None) -> Tensor:
    """(len(paths) * per_image, 3, size, size) normalised images: each picture's centre crop and
    ``per_image - 1`` augmentations (random resized crop of 25-100% of the area, horizontal flip,
    brightness and contrast 0.7-1.3), from a seeded generator. Default: examples/*.jpg."""
    generator = torch.Generator().manual_seed(seed)
    paths = sorted(EXAMPLES.glob("*.jpg")) if paths is None else list(paths)
    if not paths:
        raise ValueError("no images to calibrate on")
    batch = []
    for path in paths:
        image = TF.to_image(Image.open(path).convert("RGB"))
        side = min(image.shape[-2:])
        batch.append(TF.resize(TF.center_crop(image, [side]), [size], antialias=True))
        batch.extend(_augmented(image, size, generator) for _ in range(per_image - 1))
    x = torch.stack(batch).float() / 255.0
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _augmented(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    h, w = image.shape[-2:]
    side = min(h, w) * uniform(0.5, 1.0)  # 25-100% of the shorter side's square
    top, left = int(uniform(0, h - side)), int(uniform(0, w - side))
    crop = TF.resized_crop(image, top, left, int(side), int(side), [size], antialias=True)
    if uniform(0, 1) < 0.5:
        crop = TF.horizontal_flip(crop)
    crop = TF.adjust_brightness(crop, uniform(0.7, 1.3))
    return TF.adjust_contrast(crop, uniform(0.7, 1.3))


@torch.no_grad()
def calibrate(model: nn.Module, batch: Tensor, *, logit_spread: float = 3.0, seed: int = 0) -> nn.Module:
    """Give ``model`` (in place) trained-looking statistics; see the module docstring. Returns it,
    in eval mode. Deterministic for a given model, batch and seed."""
    from sanet_viz.models import ShuffleAttention

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, ShuffleAttention):
            for p in (module.cweight, module.sweight):
                p.copy_(torch.randn(p.shape, generator=generator))
            for p in (module.cbias, module.sbias):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    _set_batchnorm_statistics(model, batch)
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise TypeError("calibrate expects a ResNet-style model with an nn.Linear classifier named fc")
    spread = float(model(batch).std(dim=1).mean())
    fc.weight.mul_(logit_spread / spread)
    fc.bias.mul_(logit_spread / spread)
    return model


def _set_batchnorm_statistics(model: nn.Module, batch: Tensor) -> None:
    """Running statistics = the batch's, layer by layer: BatchNorm in training mode with a
    cumulative average over one forward normalises each layer with the statistics that its
    running buffers then keep, so later layers see what they will see in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: after one batch, exactly its statistics
        m.train()
    try:
        model(batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
