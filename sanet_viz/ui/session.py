"""One visitor's state (a ``gr.State``): the prepared image, the latest result, and which of the
visitor's analyses is current, so that a new click replaces (cancels) the one still running."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..preprocessing import PreparedImage
from ..progress import Cancelled
from ..results import AnalysisResult

__all__ = ["Session", "BY_GROUP", "BY_SCORE", "CROP", "WHOLE"]

BY_GROUP, BY_SCORE = "by group", "by score"
CROP, WHOLE = "centre crop (what the models see)", "whole photo (crop outlined)"


@dataclass
class Session:
    """Created per browser session (``demo.load`` sets ``page``); API calls get a fresh one each."""

    image_key: str = ""
    image: PreparedImage | None = None
    result: AnalysisResult | None = None
    page: bool = False  # a browser page: slow CAMs run in their own lane after the fast results
    run: int = 0  # the current analysis; older ones stop at their next check
    cancelled: bool = False
    group: int = 0  # the group (chunk) shown in detail
    sort: str = BY_GROUP
    view: str = CROP
    faithfulness: bool = False  # measure with every analysis
    # The visitor's two models (left, right) from the Compare tab's pickers; None: the app's
    # starting pair. An API call names its own (``/analyze``'s last input) for that call.
    pair: tuple[str, str] | None = None
    # The depth charts of ``result`` (result, gates heatmap, gates lines): 0.5-0.9 s of drawing,
    # done once per result rather than with every message.
    depth_charts: tuple[Any, Any, Any] | None = field(default=None, repr=False)
    # The analysis after its heatmaps (group maps, gates, probes, downloads), left by the page's
    # Analyse event for the event chained after it (Handlers.continue_analysis).
    rest: Iterator[dict[Any, Any]] | None = field(default=None, repr=False)

    def start(self) -> int:
        """A new analysis replaces whatever this visitor was running (events of one visitor run
        one at a time per lane; a race here could only stop an analysis one batch later)."""
        self.run += 1
        self.cancelled = False
        return self.run

    def cancel(self) -> None:
        self.cancelled = True

    def current(self, run: int) -> bool:
        return run == self.run and not self.cancelled

    def checker(self, run: int, stopping: Callable[[], bool] = lambda: False) -> Callable[[], None]:
        """A check for long computations: raises :class:`Cancelled` once ``run`` is replaced or
        cancelled, or the server is stopping."""
        def check() -> None:
            if not self.current(run):
                raise Cancelled("replaced by a newer request or cancelled")
            if stopping():
                raise Cancelled("the server is shutting down")
        return check
