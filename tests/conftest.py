"""Shared fixtures: tiny models, generated checkpoints in the real layouts, no network."""

from __future__ import annotations

import os

# Before anything imports torch.hub or huggingface_hub: tests never download.
os.environ["SANET_VIZ_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sanet_viz import models

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def benchmark_module(name: str) -> Any:
    """benchmarks/<name>.py (not a package) as a module, loaded once."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


def load_test_module() -> Any:
    """benchmarks/load_test.py: its app start/stop, readiness wait and checks serve the server tests too."""
    return benchmark_module("load_test")


def calibrated_module() -> Any:
    """benchmarks/calibrated.py: random weights with trained-looking statistics (realistic scores)."""
    return benchmark_module("calibrated")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def randomize_sa(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every SA layer non-trivial gate parameters (the paper's 0/1 init makes gates constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, models.ShuffleAttention):
                for p in (m.cweight, m.cbias, m.sweight, m.sbias, m.gn.weight, m.gn.bias):
                    p.copy_(torch.randn(p.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):  # non-trivial running stats and affine
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def tiny_sa_resnet(num_classes: int = 10, seed: int = 0) -> models.SAResNet:
    """Same SA layer and module names as SANet50; one block per stage, narrow, 4 SA groups."""
    torch.manual_seed(seed)
    return randomize_sa(models.SAResNet([1, 1, 1, 1], num_classes=num_classes, sa_groups=4,
                                        planes=(8, 16, 32, 64)), seed).eval()


@pytest.fixture
def tiny_sanet() -> models.SAResNet:
    return tiny_sa_resnet()


@pytest.fixture(scope="session")
def sanet50_random() -> models.SAResNet:
    """A full-size SANet50 with random (non-trivial) SA gates; read-only for tests."""
    torch.manual_seed(0)
    return randomize_sa(models.sa_resnet50(), 1).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory: pytest.TempPathFactory, sanet50_random: models.SAResNet) -> Path:
    """A file in the released SA-Net layout: DataParallel prefix inside the training script's dict."""
    path = tmp_path_factory.mktemp("weights") / "sa_resnet50.pth.tar"
    state = {f"module.{k}": v.clone() for k, v in sanet50_random.state_dict().items()}
    torch.save({"epoch": 100, "arch": "sa_resnet50", "state_dict": state,
                "best_acc": torch.tensor(77.88), "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(scope="session")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain torchvision ResNet50 state dict, named as torchvision's IMAGENET1K_V1 file."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tv") / "resnet50-0676ba61.pth"
    torch.save(models.resnet50().state_dict(), path)
    return path
