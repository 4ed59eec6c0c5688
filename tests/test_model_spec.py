"""The model spec is the one source of a model's configuration, and it is read: class count,
category names and evaluation preprocessing all follow it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_sa_resnet
from PIL import Image

from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.preprocessing import prepare
from sanet_viz.weights import (
    IMAGENET_EVAL,
    MODEL_SPECS,
    TIMM_BICUBIC_EVAL,
    EvalTransform,
    ModelSpec,
    WeightsDescription,
    WeightsInfo,
)

CATEGORIES = [f"shape {i}" for i in range(10)]
SMALL = EvalTransform(resize_size=80, crop_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def builder(*, num_classes: int) -> torch.nn.Module:
    return tiny_sa_resnet(num_classes=num_classes)


def test_builder_takes_its_class_count_from_the_categories() -> None:
    spec = ModelSpec("tiny", "Tiny", builder, WeightsDescription("tiny", ("t.pth",), categories=CATEGORIES), "X")
    assert spec.num_classes == 10
    assert spec.build().fc.out_features == 10
    for key, published in MODEL_SPECS.items():
        assert published.num_classes == 1000, key
        # Both papers' checkpoints: torchvision's evaluation; timm's weights: the same crop, bicubic.
        assert published.weights.transforms == (IMAGENET_EVAL if key in ("resnet50", "sanet50") else TIMM_BICUBIC_EVAL)


def test_prepare_follows_the_weights_transform() -> None:
    image = Image.fromarray(np.full((120, 160, 3), 128, np.uint8))
    small = prepare(image, SMALL)
    assert small.tensor.shape == (1, 3, 64, 64) and small.display.shape == (64, 64, 3)
    # (128/255 - 0.5) / 0.25 with this transform's mean and std
    assert float(small.tensor.mean()) == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-4)
    assert prepare(image).tensor.shape == (1, 3, 224, 224)


def lab_with(categories: list[str] | None, transform: EvalTransform = SMALL) -> Lab:
    info = WeightsInfo("untrained (test)", False)
    return Lab({"sanet50": LoadedModel("sanet50", "Tiny", tiny_sa_resnet(), info, categories=categories,
                                       transform=transform, probe_layer="layer4.0", probe_groups=4)})


def test_results_name_classes_from_the_categories_and_check_the_range() -> None:
    lab = lab_with(CATEGORIES)
    image = prepare(Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 90, 3), np.uint8)), lab.transform)
    result = analyze(lab, image, AnalysisOptions(probe=False, target_class=7, num_classes=10))
    m = result.models["sanet50"]
    assert m.target_label == "shape 7" and all(p.label in CATEGORIES for p in m.top5)
    assert result.to_dict()["models"]["sanet50"]["target_label"] == "shape 7"
    with pytest.raises(ValueError, match=r"0\.\.9"):
        analyze(lab, image, AnalysisOptions(probe=False, target_class=12))


def test_a_lab_refuses_models_with_different_preprocessing_or_wrong_categories() -> None:
    lab = lab_with(None, SMALL)
    lab.models["other"] = LoadedModel("other", "Other", tiny_sa_resnet(), WeightsInfo("untrained", False),
                                      probe_layer="layer4.0", probe_groups=4)
    with pytest.raises(ValueError, match="different preprocessing"):
        _ = lab.transform
    with pytest.raises(ValueError, match="10 outputs but its weights describe 3 categories"):
        lab_with(["a", "b", "c"])
