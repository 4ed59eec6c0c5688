"""A clean stop on SIGTERM: refuse new requests, let running ones finish or cancel them, exit 0.

**Stopping state, for request handlers.** :data:`STOPPING` is set when the server cancels the
requests that are still running (the last part of the shutdown grace, see :class:`GracefulStop`).
A long computation's progress callback (:mod:`sanet_viz.progress`) calls
:func:`raise_if_stopping`, which raises :class:`~sanet_viz.progress.Cancelled` once it is set, so
the computation stops between two batches, outside any hook or guard::

    def on_progress(done: int, total: int, what: str) -> None:
        gradio_progress(done / total, desc=what)
        shutdown.raise_if_stopping()

The handler then answers with ``gr.Error(str(exc), print_exception=False)``, so that the visitor
reads why and the log gets no traceback. :func:`stopping` tells whether it is set.

**Why the process leaves with os._exit.** A request's thread that is still inside torch when the
interpreter finalises aborts the process: when it next takes the GIL, Python ends the thread
with pthread_exit, whose unwinding through torch's C++ frames calls std::terminate ("terminate
called without an active exception", SIGABRT, exit status -6; reproduced with a daemon thread in
a ResNet50 forward and ``sys.exit`` in the main thread). A step of the slow CAM methods cannot be
interrupted, and a request cancelled by its visitor lets its thread finish its step, so after the
server is closed the process runs the ``atexit`` functions, flushes the logs and leaves with
``os._exit(0)``, skipping the finalisation that would wait for, or abort, those threads.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import gradio as gr

from ..progress import Cancelled

__all__ = ["GracefulStop", "STOPPING", "stopping", "raise_if_stopping", "CANCEL_WINDOW_S", "pending_requests"]

log = logging.getLogger("sanet-viz")

# Process-wide: one server per process. Set once by GracefulStop; tests clear it.
STOPPING = threading.Event()
CANCEL_WINDOW_S = 5.0  # the last part of the grace in which running requests are asked to cancel


def stopping() -> bool:
    """Whether the server is stopping and running requests should cancel at their next step."""
    return STOPPING.is_set()


def raise_if_stopping() -> None:
    """For progress callbacks: raise :class:`Cancelled` if the server is stopping."""
    if STOPPING.is_set():
        raise Cancelled("The server is shutting down; please try again in a minute.")


class GracefulStop:
    """SIGTERM: refuse new requests; let running and queued ones finish; exit 0 within the grace.

    With ``grace_s`` G: requests that are running or queued get until G to finish. In the last
    :data:`CANCEL_WINDOW_S` seconds (a third of G when G is shorter) :data:`STOPPING` is set, so
    requests that check it stop at their next step. At G the server closes: when nothing is
    running, the clients first get a moment to fetch their results; what still runs then (a step
    that cannot be interrupted) is dropped, its client disconnected. The process then leaves with
    status 0 (see the module docstring for why through ``os._exit``). A second signal exits at once.
    """

    def __init__(self, demo: gr.Blocks | None = None, grace_s: float = 30.0) -> None:
        self.demo, self.grace_s, self.stopping = demo, grace_s, False

    def install(self) -> GracefulStop:
        signal.signal(signal.SIGTERM, self)
        return self

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:  # a second signal while draining
            log.info("signal %s again: exiting now", signum)
            self._leave(0)
        if self.demo is None or not getattr(self.demo, "is_running", False):  # still loading: main thread only
            log.info("signal %s: exiting", signum)
            sys.exit(0)
        self.stopping = True
        started = time.monotonic()
        had_work = sum(self._pending()) > 0
        log.info("signal %s: refusing new requests; waiting up to %.0f s for %d running and %d queued",
                 signum, self.grace_s, *self._pending())
        self._refuse_new()
        deadline = started + self.grace_s
        window = min(CANCEL_WINDOW_S, self.grace_s / 3)
        self._wait_idle(deadline - window)
        if sum(self._pending()):
            STOPPING.set()
            log.info("asking %d running request(s) to cancel at their next step", self._pending()[0])
            self._wait_idle(deadline)
        running, waiting = self._pending()
        if running or waiting:
            log.warning("shutdown grace over: dropping %d running and %d queued requests", running, waiting)
        else:
            STOPPING.set()  # nothing runs: anything started from now on stops at once
            if had_work:  # clients fetch result files after the last message: serve until requests stop
                self._until_quiet(quiet_s=1.5, limit_s=max(0.0, min(10.0, deadline - time.monotonic())))
            self._close()
        log.info("stopped %.1f s after the signal", time.monotonic() - started)
        self._leave(0)

    def _refuse_new(self) -> None:
        queue = self.demo._queue  # type: ignore[union-attr]

        async def refuse(*args: Any, **kwargs: Any) -> tuple[bool, str, str]:
            return False, "The server is shutting down; please try again in a minute.", "queue_full"

        queue.push = refuse  # type: ignore[method-assign]

    def _wait_idle(self, until: float) -> None:
        while sum(self._pending()) and time.monotonic() < until:
            time.sleep(0.1)

    def _close(self) -> None:
        """Close the server when no request streams results any more (else uvicorn cancels the
        streams after its own timeout and logs their tracebacks)."""
        server = getattr(self.demo, "server", None)
        if getattr(server, "config", None) is not None:  # idle streams (heartbeats) must not hold up
            server.config.timeout_graceful_shutdown = 2  # the exit, nor the deletion of Gradio's files
        self.demo.close()  # type: ignore[union-attr]

    def _leave(self, status: int) -> None:
        """Run the atexit functions, flush the logs and streams, and end the process now."""
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to say there
                stream.flush()
        os._exit(status)

    def _until_quiet(self, quiet_s: float, limit_s: float) -> None:
        state = getattr(getattr(self.demo, "server", None), "server_state", None)
        if state is None:
            return
        end, last, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < end:
            if state.total_requests != last:
                last, since = state.total_requests, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    def _pending(self) -> tuple[int, int]:
        return pending_requests(self.demo)


def pending_requests(demo: gr.Blocks | None) -> tuple[int, int]:
    """(running, waiting) requests in ``demo``'s queue; (0, 0) before it has one."""
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return 0, 0
    running = sum(len(job) for job in getattr(queue, "active_jobs", []) if job)
    try:
        waiting = len(queue)
    except TypeError:
        waiting = 0
    return running, waiting
