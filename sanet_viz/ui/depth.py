"""The Across depth tab and the charts of the Download tab (a mixin of :class:`handlers.Handlers`):
each gated model of the pair with the unit its gates have (SA: per group, channel and spatial;
SE, ECA: per channel), both on one axis of depth when both have gates, and what a model without
attention modules has instead (nothing, said so)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import charts
from ..results import AnalysisResult, ModelResult
from . import views
from .pairs import gate_layout
from .session import Session

if TYPE_CHECKING:
    from .pool import ModelPool

__all__ = ["DepthHandlers", "depth_pictures", "result_charts"]


def depth_pictures(gated: Sequence[ModelResult]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(each model's gates in its unit, one above the other; the mean gates on one axis of depth).

    One SA model alone keeps its lines of mean channel and spatial gates per module (the app's
    view before other models could be picked); otherwise every gated model on one depth axis."""
    pictures = [charts.to_image(fig) for m in gated if (fig := charts.model_gates_chart(m)) is not None]
    heatmap = pictures[0] if len(pictures) == 1 else views.stacked(pictures, centre=True)
    if not gated:
        return None, None
    if len(gated) == 1 and gated[0].sa_gates:
        return heatmap, charts.to_image(charts.gates_lines(gated[0].sa_gates))
    return heatmap, charts.to_image(charts.gates_across_depth(gated))


def result_charts(result: AnalysisResult) -> dict[str, Any]:
    """Every chart of a result, by file name (the Download tab's SVGs): the default pair's names
    are kept (gates = SA's heatmaps); other models' gates are gates-<key>."""
    out = {"overlays": charts.overlay_pair(result)}
    if any(m.probe is not None for m in result.models.values()):
        out["probe"] = charts.probe_chart(result)
    right = list(result.models.values())[-1]
    where = "SA_5_3" if right.sa_gates else (right.probe.layer if right.probe else "the last block")
    out["groups"] = charts.group_grid(right.group_maps, title=f"{right.display_name}: group maps of {where}"
                                                              + ("" if right.weights.pretrained else " (UNTRAINED)"))
    gated = [m for m in result.models.values() if m.gates is not None]
    for m in gated:
        tag = "" if m.weights.pretrained else f"\n{charts.UNTRAINED_NOTE}"
        if m.sa_gates:
            out["gates"] = charts.gates_heatmap(m.sa_gates, title=f"{m.display_name}: SA gates{tag}")
            out["gates-by-depth"] = charts.gates_lines(m.sa_gates)
        else:
            out[f"gates-{m.key}"] = charts.model_gates_chart(m)
    if len(gated) == 2:
        out["gates-across-depth"] = charts.gates_across_depth(gated)
    return out


class DepthHandlers:
    pool: ModelPool
    settings: Any
    page: Any

    pair_of: Callable[[Session | None], tuple[str, str]]  # PairHandlers'

    def _gates_placeholder(self, pair: Sequence[str]) -> str:
        gated = [(self.pool.name(k), layout.kind) for k in pair if (layout := gate_layout(self.pool, k))]
        if not gated:
            return "*Neither model has attention modules: there are no gates to show.*"
        return "*" + " and ".join(f"{name}'s {kind} gates" for name, kind in gated) + " appear here.*"

    def _depth_views(self, session: Session) -> dict[Any, Any]:
        result, d = session.result, self.page.depth
        gated = [m for m in result.models.values() if m.gates is not None] if result else []
        if result is None or not gated:
            pair = tuple(result.models) if result else self.pair_of(session)
            return {d.heatmap: None, d.lines: None, d.nearest: self._gates_placeholder(pair)}
        if session.depth_charts is None or session.depth_charts[0] is not result:
            session.depth_charts = (result, *depth_pictures(gated))  # half a second: once per result
        _, heatmap, lines = session.depth_charts
        sa = next((m for m in gated if m.sa_gates), None)
        return {d.heatmap: heatmap, d.lines: lines,
                d.nearest: views.nearest_view(sa.sa_gates, self.settings.profiles) if sa and sa.sa_gates else ""}
