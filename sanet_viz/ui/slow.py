"""The slow lane (a mixin of :class:`handlers.Handlers`): Score-CAM and Ablation-CAM, left pending
by a page's fast lane, completed here one model at a time, in a Gradio concurrency group of their
own (limit 1), with progress on the panel being computed and a Cancel button. An API call, which
has no page to come back to, completes them inline through the same one-at-a-time lane."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from ..analysis import AnalysisOptions, complete_cam
from ..cam import CAM_METHODS
from ..progress import Cancelled
from ..results import AnalysisResult
from . import views
from .session import Session
from .tabs import SLOTS

__all__ = ["SlowLaneHandlers"]

log = logging.getLogger("sanet-viz")


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class SlowLaneHandlers:
    """Completing pending slow CAMs (a mixin of :class:`handlers.Handlers`)."""

    pool: Any
    settings: Any
    page: Any
    slow_lane: threading.Semaphore
    _pending: Callable[[AnalysisResult], list[str]]
    _at_least_one: Callable[[Iterator[dict[Any, Any]]], Iterator[dict[Any, Any]]]
    _compare_views: Callable[[Session, float], dict[Any, Any]]
    _measure: Callable[..., Iterator[dict[Any, Any]]]
    _final: Callable[[Session, float], dict[Any, Any]]

    def _slow_estimate(self, result: AnalysisResult, options: AnalysisOptions) -> str:
        """What the slow method will cost, said before it starts."""
        parts = []
        for key in self._pending(result):
            m, lm = result.models[key], self.pool.get(key)
            acts = m.pending_cam
            assert acts is not None
            flat = acts.flatten(2)
            varying = int((flat.amax(-1) != flat.amin(-1)).sum())
            if options.method == "scorecam":
                precision = lm.probe_precision(options.precision).replace("check", "fp32")
                ms = lm.forward_ms.get(precision) or lm.forward_ms.get("fp32")
                eta = f", about {_fmt_seconds(varying * ms / 1e3)}" if ms else ""
                parts.append(f"{m.display_name}: {varying:,} masked forwards ({precision}){eta}")
            else:
                parts.append(f"{m.display_name}: {acts.shape[1]:,} ablated channels through the layers after "
                             f"{m.cam_layer}")
        label = CAM_METHODS[options.method][1].split(" (")[0]
        return f"<b>{label}</b> will run next, one model at a time: " + "; ".join(parts) + \
            ". The other views are ready now; <b>Cancel</b> stops it."

    def complete_slow(self, opacity: float, session: Session | None) -> Iterator[dict[Any, Any]]:
        """Compute pending Score-CAM / Ablation-CAM maps, one model at a time, with progress."""
        yield from self._at_least_one(self._complete_slow(opacity, session))

    def _complete_slow(self, opacity: float, session: Session | None) -> Iterator[dict[Any, Any]]:
        if session is None or session.result is None or not self._pending(session.result):
            return
        run, result = session.run, session.result
        with self.slow_lane:
            yield from self._complete_pending(session, run, result.options, opacity)
            if session.current(run) and not self._pending(result):
                if session.faithfulness:
                    yield from self._measure(session, session.checker(run, self.settings.stopping))
                yield self._final(session, opacity)

    def _complete_pending(self, session: Session, run: int, options: AnalysisOptions,
                          opacity: float) -> Iterator[dict[Any, Any]]:
        """Every pending slow CAM of the session's result, one model after the other (hold the lane)."""
        assert session.result is not None
        for key in self._pending(session.result):
            if not session.current(run):
                return
            yield from self._slow_steps(session, run, key, options, opacity)

    def _slow_steps(self, session: Session, run: int, key: str, options: AnalysisOptions,
                    opacity: float) -> Iterator[dict[Any, Any]]:
        """One model's slow CAM in a worker thread; this generator reports its progress."""
        result, image, lm = session.result, session.image, self.pool.get(key)
        assert result is not None and image is not None
        caption = self.page.compare.captions[SLOTS[list(result.models).index(key)]]
        check = session.checker(run, self.settings.stopping)
        state: dict[str, Any] = {"done": 0, "total": 1, "start": time.perf_counter()}

        def progress(done: int, total: int, what: str) -> None:
            state.update(done=done, total=total)
            check()

        def work() -> None:
            try:
                complete_cam(lm, image, result.models[key], options, progress=progress)
            except BaseException as exc:  # noqa: BLE001 - handed to the generator below
                state["error"] = exc

        worker = threading.Thread(target=work, name=f"slow-cam-{key}", daemon=True)
        worker.start()
        label = CAM_METHODS[options.method][1].split(" (")[0]
        try:
            while worker.is_alive():
                worker.join(0.75)
                yield {caption: views.status_html(self._progress_text(label, state), kind="busy")}
        finally:
            if worker.is_alive():  # the page went away or Cancel was pressed: stop at the next batch
                session.cancel()
                worker.join(30)
        error = state.get("error")
        if isinstance(error, Cancelled):
            if self.settings.stopping():
                raise gr.Error("The server is shutting down; please try again in a minute.", print_exception=False)
            if run != session.run:  # replaced by a newer request, which owns the page now
                return
            yield {self.page.compare.status: views.status_html(f"{label} stopped: {error}.", kind="stale"),
                   caption: views.status_html(f"{label} cancelled.", kind="stale"),
                   self.page.controls.cancel: gr.update(visible=False)}
            return
        if error is not None:
            log.exception("slow CAM failed", exc_info=error)
            raise gr.Error(f"{label} failed: {error}", print_exception=False)
        yield self._compare_views(session, opacity)

    @staticmethod
    def _progress_text(label: str, state: dict[str, Any]) -> str:
        done, total = state["done"], max(state["total"], 1)
        elapsed = time.perf_counter() - state["start"]
        eta = f", about {_fmt_seconds(elapsed * (total - done) / done)} left" if done else ""
        return f"{label}: {done:,} of {total:,} ({done / total:.0%}){eta}"

    def cancel(self, session: Session | None) -> dict[Any, Any]:
        if session is not None:
            session.cancel()
        return {self.page.compare.status: views.status_html("Cancelled.", kind="stale"),
                self.page.controls.cancel: gr.update(visible=False)}
