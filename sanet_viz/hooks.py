"""Things that attach to a model for one pass and are undone on ``__exit__``: hook owners (each
keeps its handles and removes them) and :class:`ModelStateGuard`. Always use them with ``with``."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention import LAYOUTS, GateLayout

__all__ = ["resolve_module", "HookOwner", "FeatureCapture", "GateRecorder", "SAGateRecorder", "ModelStateGuard"]


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; accepts paper names (``SA_5_3`` -> ``layer4.2``)."""
    from .models import paper_name_to_module

    asked = name
    if name.startswith("SA_"):
        name = paper_name_to_module(name)
    modules = dict(model.named_modules())
    if name not in modules:
        blocks = [n for n in modules if n.count(".") == 1 and n.startswith("layer")]
        shown = repr(name) if asked == name else f"{asked!r} ({name})"
        raise ValueError(f"{type(model).__name__} has no module {shown}; bottlenecks are "
                         f"{', '.join(blocks[:3])} ... {blocks[-1] if blocks else ''}")
    return modules[name]


class HookOwner:
    """Base for objects that register hooks: handles are kept and removed on exit."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def _register(self, module: nn.Module, hook: Any) -> None:
        self._handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> HookOwner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class FeatureCapture(HookOwner):
    """Keeps the (detached) outputs of the named modules from the last forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        super().__init__()
        self.outputs: dict[str, Tensor] = {}
        for name in names:
            self._register(resolve_module(model, name), self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            # A clone: torchvision's blocks and the official SA block modify tensors in place.
            self.outputs[name] = output.detach().clone()
        return hook

    def __enter__(self) -> FeatureCapture:
        return self


class GateRecorder(HookOwner):
    """Each image's attention gates at every module named in ``modules`` (depth name -> module
    name, :meth:`attention.GateLayout.modules`), read as ``layout`` says.

    ``values[depth][branch]`` is (N, width): SA's mean channel and spatial gate per group, SE's
    and ECA's gate per channel. ``keep_maps`` lists depths whose SA spatial gate maps
    (N, G, H, W) are kept too.
    """

    def __init__(self, model: nn.Module, layout: GateLayout | None, modules: dict[str, str],
                 keep_maps: Iterable[str] = ()) -> None:
        super().__init__()
        self.values: dict[str, dict[str, Tensor]] = {}
        self.spatial_maps: dict[str, Tensor] = {}
        if modules and layout is None:
            raise ValueError("gate modules given without a layout to read them")
        keep = set(keep_maps)
        for depth, module_name in modules.items():
            self._register(resolve_module(model, module_name), self._hook(layout, depth, depth in keep))

    def _hook(self, layout: GateLayout | None, depth: str, keep_map: bool) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            values, spatial_map = layout.read(module, inputs, output)  # type: ignore[union-attr]
            self.values[depth] = values
            if keep_map and spatial_map is not None:
                self.spatial_maps[depth] = spatial_map
        return hook

    @property
    def channel(self) -> dict[str, Tensor]:
        """Depth -> (N, width) channel gates (every layout has them)."""
        return {d: v["channel"] for d, v in self.values.items()}

    @property
    def spatial(self) -> dict[str, Tensor]:
        """Depth -> (N, G) mean spatial gates (SA only)."""
        return {d: v["spatial"] for d, v in self.values.items() if "spatial" in v}

    def __enter__(self) -> GateRecorder:
        return self


class SAGateRecorder(GateRecorder):
    """Per SA module and group: the mean channel gate and mean spatial gate of each image.

    ``modules`` maps paper names to SA module names (see :func:`models.sa_module_names`).
    ``keep_maps`` lists paper names whose spatial gate maps (N, G, H, W) are kept too.
    """

    def __init__(self, model: nn.Module, modules: dict[str, str], keep_maps: Iterable[str] = ()) -> None:
        super().__init__(model, LAYOUTS["SA"], modules, keep_maps)

    def __enter__(self) -> SAGateRecorder:
        return self


class ModelStateGuard:
    """Puts back, on exit, what a pass may change on a shared model: every module's train/eval
    mode, every parameter's ``requires_grad`` and its ``.grad`` (pytorch-grad-cam calls
    ``model.eval()`` and ``zero_grad()``, and a backward fills ``.grad``)."""

    def __init__(self, model: nn.Module) -> None:
        self._modes = [(m, m.training) for m in model.modules()]
        self._params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def __enter__(self) -> ModelStateGuard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for m, training in self._modes:
            m.training = training
        for p, requires_grad, grad in self._params:
            p.requires_grad_(requires_grad)
            p.grad = grad
