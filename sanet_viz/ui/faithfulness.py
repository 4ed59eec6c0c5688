"""The Faithfulness tab's handlers: deletion, insertion and ROAD of both maps, and the
randomisation check, on demand (a mixin of :class:`handlers.Handlers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gradio as gr

from .. import charts
from ..analysis import add_faithfulness, add_randomization, faithfulness_verdict
from ..progress import Cancelled
from . import views
from .session import Session

if TYPE_CHECKING:
    from ..lab import Lab
    from ..results import AnalysisResult

__all__ = ["FaithfulnessHandlers"]


class FaithfulnessHandlers:
    lab_for: Callable[[AnalysisResult], Lab]  # the models of a result (PairHandlers')
    settings: Any
    page: Any
    _final: Callable[[Session, float], dict[Any, Any]]
    _pending: Callable[[AnalysisResult], list[str]]


    def measure(self, opacity: float, session: Session | None) -> Iterator[dict[Any, Any]]:
        """Deletion, insertion and ROAD of both maps as shown (about 2 x 74 forwards)."""
        session = self._ready(session)
        try:
            yield from self._measure(session, session.checker(session.run, self.settings.stopping))
        except Cancelled as exc:
            raise gr.Error(f"Stopped: {exc}.", print_exception=False) from None
        yield self._final(session, opacity)

    def randomize(self, opacity: float, session: Session | None) -> Iterator[dict[Any, Any]]:
        """The randomisation check of both maps (one CAM per block), after the measures."""
        session = self._ready(session)
        check = session.checker(session.run, self.settings.stopping)
        result, image = session.result, session.image
        assert result is not None and image is not None
        try:
            yield from self._measure(session, check)
            for key in result.models:
                yield {self.page.faithfulness.verdict: views.status_html(
                    f"Randomising {result.models[key].display_name} block by block…", kind="busy")}
                add_randomization(self.lab_for(result), image, result, model_keys=(key,), progress=lambda *_: check())
                yield self._faithfulness_views(session)
        except Cancelled as exc:
            raise gr.Error(f"Stopped: {exc}.", print_exception=False) from None
        yield self._final(session, opacity)

    def _ready(self, session: Session | None) -> Session:
        if session is None or session.result is None or session.image is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        if self._pending(session.result):
            raise gr.Error("Wait for the slow method to finish (or cancel it) first.", print_exception=False)
        return session

    def _measure(self, session: Session, check: Callable[[], None]) -> Iterator[dict[Any, Any]]:
        result, image = session.result, session.image
        assert result is not None and image is not None
        if all(m.faithfulness is not None for m in result.models.values()):
            return
        yield {self.page.faithfulness.verdict: views.status_html(
            "Measuring deletion, insertion and ROAD for both maps…", kind="busy")}
        add_faithfulness(self.lab_for(result), image, result, randomization=False, progress=lambda *_: check())
        yield self._faithfulness_views(session)

    def _faithfulness_views(self, session: Session) -> dict[Any, Any]:
        result, f = session.result, self.page.faithfulness
        measured = {m.display_name: m for m in result.models.values() if m.faithfulness is not None} if result else {}
        if not measured:
            return {f.verdict: "", f.curves: None, f.road: "", f.cascade: None, f.strips: None}
        untrained = [n for n, m in measured.items() if not m.weights.pretrained]
        out: dict[Any, Any] = {
            f.verdict: f'<div class="banner {"banner-untrained" if untrained else "banner-pretrained"}">'
                       f"{faithfulness_verdict(result)}</div>",  # type: ignore[arg-type]
            f.curves: charts.to_image(charts.faithfulness_curves(
                {n: (m.faithfulness.deletion, m.faithfulness.insertion) for n, m in measured.items()},  # type: ignore[union-attr]
                untrained=untrained)),
            f.road: views.faithfulness_table(measured)}
        cascades = {n: m.faithfulness.randomization for n, m in measured.items()  # type: ignore[union-attr]
                    if m.faithfulness.randomization is not None}  # type: ignore[union-attr]
        if cascades:
            out[f.cascade] = charts.to_image(charts.randomization_chart(cascades, untrained=untrained))
            out[f.strips] = views.stacked([charts.to_image(charts.randomization_strip(
                measured[n].cam, r, display=result.display, title=n)) for n, r in cascades.items()])  # type: ignore[union-attr,arg-type]
        return out
