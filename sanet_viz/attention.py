"""The attention modules the lab can read, one :class:`GateLayout` each: Shuffle Attention (SA,
ours) and, from timm, Squeeze-and-Excitation (SE) and Efficient Channel Attention (ECA), the SA
paper's channel-attention baselines on the same ResNet50 backbone.

A layout says where a model's gates are (one module per bottleneck, named by depth: ``SA_5_3``,
``SE_5_3``, ...), what one gate value stands for (its ``unit``: the mean over an SA group's
channels, or one channel), which branches a module has, and how to read one forward pass's gates
from a forward hook on those modules (:meth:`GateLayout.read`). Hook owners live in
:mod:`hooks` (:class:`hooks.GateRecorder`).

- SA (``layerX.Y.sa``): 64 groups; per group the mean channel gate and the mean spatial gate.
- SE (``layerX.Y.se.gate``, the sigmoid): one gate per channel,
  sigmoid(fc2(relu(fc1(mean_hw(x))))).
- ECA (``layerX.Y.se.gate``): one gate per channel, sigmoid(conv1d_k(mean_hw(x))) across channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .models import ShuffleAttention, bottleneck_names, module_to_paper_name

__all__ = ["GateLayout", "GateProfile", "LAYOUTS", "layout_of", "seresnet50", "ecaresnet50d"]


@dataclass(frozen=True)
class GateLayout:
    """Where a kind of attention module keeps its gates, and how to read them."""

    kind: str  # "SA", "SE", "ECA": also the prefix of depth names (SE_2_1 ... SE_5_3)
    title: str  # what a person reads
    unit: str  # what one gate value is: "group" (an SA group's mean) or "channel"
    branches: tuple[str, ...]  # ("channel", "spatial") for SA, ("channel",) for SE and ECA
    hooked: str  # the module to hook, relative to a bottleneck ("sa", "se.gate")

    def depth_name(self, block: str) -> str:
        """``"layer4.2"`` -> ``"SE_5_3"`` (the paper's stage and block numbering, this kind's prefix)."""
        return self.kind + module_to_paper_name(block).removeprefix("SA")

    def modules(self, model: nn.Module) -> dict[str, str]:
        """Depth name -> name of the module to hook, for every bottleneck that has this module."""
        names = dict(model.named_modules())
        return {self.depth_name(block): f"{block}.{self.hooked}" for block in bottleneck_names(model)
                if f"{block}.{self.hooked}" in names}

    @torch.no_grad()
    def read(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor,
             ) -> tuple[dict[str, Tensor], Tensor | None]:
        """One forward pass's gates at one module: branch -> (N, width) fp32 and, for SA, the
        spatial gate maps (N, G, H, W) averaged over each group's channels (else None)."""
        if self.kind == "SA":
            gate_c, gate_s = module.gates(inputs[0].detach())  # type: ignore[operator]
            spatial_map = gate_s.float().mean(2)
            return {"channel": gate_c.float().mean(-1), "spatial": spatial_map.mean((-2, -1))}, spatial_map
        # SE's sigmoid gives (N, C, 1, 1), ECA's (N, 1, C): one value per channel either way.
        return {"channel": output.detach().float().reshape(output.shape[0], -1)}, None


LAYOUTS: dict[str, GateLayout] = {
    "SA": GateLayout("SA", "Shuffle Attention", "group", ("channel", "spatial"), "sa"),
    "SE": GateLayout("SE", "Squeeze-and-Excitation", "channel", ("channel",), "se.gate"),
    "ECA": GateLayout("ECA", "Efficient Channel Attention", "channel", ("channel",), "se.gate"),
}


def layout_of(model: nn.Module) -> GateLayout | None:
    """The layout of ``model``'s attention modules, found from its blocks; None for a plain ResNet."""
    modules = dict(model.named_modules())
    for block in bottleneck_names(model):
        if isinstance(modules.get(f"{block}.sa"), ShuffleAttention):
            return LAYOUTS["SA"]
        se = modules.get(f"{block}.se")
        if se is not None:
            from timm.layers import EcaModule, SEModule  # a block with an `se` module comes from timm

            if isinstance(se, SEModule):
                return LAYOUTS["SE"]
            if isinstance(se, EcaModule):
                return LAYOUTS["ECA"]
            raise ValueError(f"{block}.se is a {type(se).__name__}: no gate layout reads it")
    return None


@dataclass
class GateProfile:
    """One image's gates in one model: depth name -> branch -> (width,) values in [0, 1]."""

    layout: GateLayout
    values: dict[str, dict[str, np.ndarray]]

    @property
    def depths(self) -> list[str]:
        return list(self.values)

    def widths(self) -> list[int]:
        """Gates per branch at each depth (SA: 64 groups everywhere; SE/ECA: 256 ... 2048 channels)."""
        return [len(next(iter(v.values()))) for v in self.values.values()]

    def flat(self, depth: str) -> np.ndarray:
        """The profile at ``depth``: its branches one after another (SA: 64 channel then 64 spatial)."""
        return np.concatenate([np.asarray(self.values[depth][b], np.float64) for b in self.layout.branches])

    def to_dict(self) -> dict[str, object]:
        """result.json's ``gates``: what the values are, then depth -> branch -> list."""
        return {"module": self.layout.title, "kind": self.layout.kind, "unit": self.layout.unit,
                "branches": list(self.layout.branches),
                "depths": {d: {b: np.asarray(v[b]).tolist() for b in self.layout.branches}
                           for d, v in self.values.items()}}


def seresnet50(*, num_classes: int = 1000) -> nn.Module:
    """timm's SE-ResNet50 (an SE module after each bottleneck's bn3: ``layerX.Y.se``), untrained."""
    return _timm_model("seresnet50", num_classes)


def ecaresnet50d(*, num_classes: int = 1000) -> nn.Module:
    """timm's ECA-ResNet50d (ECA after each bn3: ``layerX.Y.se``; deep stem and average-pool
    downsampling, the "D" tweaks), untrained."""
    return _timm_model("ecaresnet50d", num_classes)


def _timm_model(name: str, num_classes: int) -> nn.Module:
    import timm  # a second of imports: only when such a model is built

    return timm.create_model(name, pretrained=False, num_classes=num_classes)
