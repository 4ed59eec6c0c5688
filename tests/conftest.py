"""Shared fixtures: tiny models, generated checkpoints in the real layouts, no network."""

from __future__ import annotations

import os

# Before anything imports torch.hub or huggingface_hub: tests never download.
os.environ["SANET_VIZ_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# The app servers and CLIs the tests start run their probes in fp32 unless a test asks for auto
# (--precision auto, AnalysisOptions(precision="auto")): auto's bf16 check at each server's
# start-up cost ~15 s on a bf16 CPU and is tested where it is meant.
os.environ.setdefault("SANET_VIZ_PRECISION", "fp32")
# pytest-xdist's workers (addopts: -n 3) share the machine's cores: one intra-op thread each, for
# them and the app servers they start, instead of every process spinning a thread per core
# (measured on 2 cores: 752 s -> 652 s of pytest). Without workers (-n 0) torch's default stays.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import narrow_models
import pytest
import torch
from torch import nn
from torchvision.models.resnet import ResNet

from sanet_viz import models

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch came first

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


# The files that take longest (worker-seconds measured at -n 3 on 2 cores: 144, 125, 121, 117,
# 94, 68, 66, 64), started first: a worker handed one of them last would run alone while the others
# idle. Only the order changes (addopts: --no-loadscope-reorder); the rest follow in file order.
HEAVY_FILES = ("test_reproduce.py", "test_app_visitors.py", "test_hardening.py", "test_server_security.py",
               "test_app.py", "test_cli.py", "test_app_models.py", "test_reproduce_gates.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable: file order within
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


def tiny_resnet(num_classes: int = 10, seed: int = 0,
                planes: tuple[int, int, int, int] = (8, 16, 32, 64)) -> ResNet:
    """torchvision's ResNet with ResNet50's module names, one bottleneck per stage and narrow
    stages (a Score-CAM at layer4.0 of a 2048-channel one runs 2048 full forwards a model)."""
    torch.manual_seed(seed)  # seeded like tiny_sa_resnet: a test's scores are the same every run
    return narrow_models.resnet((1, 1, 1, 1), planes, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Many small forwards: one intra-op thread is steadier on a shared 2-core machine.
    A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and each bottleneck's output (fp32), in the model's channel order (an inference
    copy's blocks may keep their stream in another order: their ``stream_order``)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, output: torch.Tensor, name: str) -> None:
        value = output.detach().float()
        order = getattr(module, "stream_order", None)
        if order is not None:
            value = torch.empty_like(value).index_copy_(1, order, value)
        outputs[name] = value

    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: keep(m, o, name)) for name in models.bottleneck_names(model)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits.float(), outputs


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


# ---------------------------------------------------------------------------------------------
# The pointing-game task and its small trained SA-ResNet (test_pointing_game, test_faithfulness):
# noise pictures with one coloured square; the class is the square's colour.

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


@pytest.fixture(scope="session")
def pointing_model() -> models.SAResNet:
    """A small SA-ResNet that learns the task for about a minute on the CPU, once per session.

    Read-only for tests (eval mode, frozen): the faithfulness tests check it is left as found.
    """
    import time

    import numpy as np
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = models.SAResNet([1, 1, 1, 1], num_classes=len(COLOURS), sa_groups=4, planes=(8, 16, 32, 64))
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


@pytest.fixture(scope="session")
def narrow_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Narrow ResNet50 and SANet50 files in the released layouts, for ``tests/narrow_app.py``."""
    return narrow_models.save_checkpoints(tmp_path_factory.mktemp("narrow-weights"))
