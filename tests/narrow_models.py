"""Narrow copies of the registered architectures, for app servers in tests.

Every module name, block count and SA group count of the real models is kept (16 SA layers, 64
groups at SA_5_3, ``layerX.Y.se`` for SE), only the channel widths shrink: an analysis then costs
a fraction of a second instead of seconds, while the server, the checkpoints' layouts and every
view are the real ones.

Tests whose point is a request that takes a while (queue limits, cancellation, a Score-CAM in its
lane, SIGTERM with a request in flight) give the narrow models wall time without CPU: a sleep of
``seconds_per_image`` per image in every forward (it releases the GIL, as torch's kernels do), so
their requests last seconds while two test workers keep the 2 cores. Only a test whose point is
native code in flight (test_shutdown's abort in Score-CAM) keeps the full-size models.

``python tests/narrow_app.py ARGS`` is ``python app.py ARGS`` with these architectures
(``SANET_VIZ_TEST_SECONDS_PER_IMAGE``: the sleep).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from sanet_viz import models
from sanet_viz.weights import MODEL_SPECS

# 32 planes a stage: SA's 64 groups need 2 x 64 channels at every bottleneck's output (32 x 4).
PLANES = (32, 32, 32, 32)
LAYERS = (3, 4, 6, 3)
APP = Path(__file__).with_name("narrow_app.py")


def resnet(layers: tuple[int, ...], planes: tuple[int, ...], *, num_classes: int) -> ResNet:
    """torchvision's ResNet with bottlenecks, ResNet50's module names and the given stage widths
    (``width_per_group`` alone would keep the 64-channel stem and 2048 channels at layer4)."""
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=8)  # all replaced below
    net.inplanes, net.base_width = planes[0], 64
    net.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(planes[0])
    for i, (width, blocks, stride) in enumerate(zip(planes, layers, (1, 2, 2, 2), strict=True)):
        setattr(net, f"layer{i + 1}", net._make_layer(Bottleneck, width, blocks, stride=stride))
    net.fc = nn.Linear(planes[3] * Bottleneck.expansion, num_classes)
    return net


def narrow_resnet50(*, num_classes: int = 1000) -> ResNet:
    """torchvision's ResNet50 (its module names and block counts) with narrow stages."""
    return resnet(LAYERS, PLANES, num_classes=num_classes)


def narrow_sa_resnet50(*, num_classes: int = 1000) -> models.SAResNet:
    return models.SAResNet(list(LAYERS), num_classes=num_classes, planes=PLANES)


def _narrow_timm(name: str) -> Callable[..., nn.Module]:
    def build(*, num_classes: int = 1000) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, channels=PLANES,
                                 stem_width=PLANES[0])
    return build


BUILDERS = {"resnet50": narrow_resnet50, "sanet50": narrow_sa_resnet50,
            "seresnet50": _narrow_timm("seresnet50"), "ecaresnet50d": _narrow_timm("ecaresnet50d")}


SECONDS_PER_IMAGE_ENV = "SANET_VIZ_TEST_SECONDS_PER_IMAGE"


@functools.cache
def _sleeping(cls: type[nn.Module], seconds_per_image: float) -> type[nn.Module]:
    """``cls`` whose forward first sleeps ``seconds_per_image`` per image of its batch; same name,
    so messages that name the model's type read as they would."""
    def forward(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(seconds_per_image * x.shape[0])
        return cls.forward(self, x, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})


def _taking(build: Callable[..., nn.Module], seconds_per_image: float) -> Callable[..., nn.Module]:
    def build_sleeping(*, num_classes: int = 1000) -> nn.Module:
        model = build(num_classes=num_classes)
        model.__class__ = _sleeping(type(model), seconds_per_image)  # no hook: hook counts stay the app's
        return model
    return build_sleeping


def use_narrow_models(*, seconds_per_image: float = 0.0) -> None:
    """Point the registry's builders at the narrow architectures (in place: every module that
    imported ``MODEL_SPECS`` sees them); with ``seconds_per_image``, their forwards also sleep."""
    if set(BUILDERS) != set(MODEL_SPECS):
        raise RuntimeError(f"no narrow copy here of {sorted(set(MODEL_SPECS) - set(BUILDERS))}")
    if seconds_per_image < 0:
        raise ValueError(f"seconds_per_image must be >= 0, not {seconds_per_image}")
    for key, build in BUILDERS.items():
        builder = _taking(build, seconds_per_image) if seconds_per_image else build
        MODEL_SPECS[key] = dataclasses.replace(MODEL_SPECS[key], builder=builder)


def save_checkpoints(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Narrow ResNet50 and SANet50 files in the released layouts (torchvision's plain state dict;
    SA-Net's training dict with the DataParallel prefix), with non-trivial SA gates."""
    from conftest import randomize_sa

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    resnet_path = folder / "resnet50-0676ba61.pth"
    torch.save(narrow_resnet50().state_dict(), resnet_path)
    sanet_path = folder / "sa_resnet50.pth.tar"
    state = {f"module.{k}": v for k, v in randomize_sa(narrow_sa_resnet50(), seed + 1).state_dict().items()}
    torch.save({"epoch": 100, "arch": "sa_resnet50", "state_dict": state, "best_acc": torch.tensor(77.88),
                "optimizer": {"state": {}, "param_groups": []}}, sanet_path)
    return {"resnet50": resnet_path, "sanet50": sanet_path}
