"""Progress and cancellation for long computations: slow CAM methods, probes, faithfulness
measures, data-set runs.

A long computation takes ``progress: ProgressFn | None`` and calls :func:`step` between units of
work (a batch of forwards). The caller's callback shows the progress and may raise
:class:`Cancelled` to stop it there: a visitor who clicked Cancel, a newer request of the same
visitor, a server that is shutting down. Nothing is left half-done in a shared model: callers
stop between batches, outside any hook or guard.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Cancelled", "ProgressFn", "step"]


class Cancelled(RuntimeError):
    """Raised by a progress callback to stop the computation that called it."""


# (done, total, what): ``done`` of ``total`` units of the named work are finished.
ProgressFn = Callable[[int, int, str], None]


def step(progress: ProgressFn | None, done: int, total: int, what: str) -> None:
    """Report progress (and give the caller its chance to cancel) if there is a callback."""
    if progress is not None:
        progress(done, total, what)
