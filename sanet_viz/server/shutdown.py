"""A clean stop on SIGTERM: refuse new requests, let running ones finish, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import gradio as gr

__all__ = ["GracefulStop"]

log = logging.getLogger("sanet-viz")


class GracefulStop:
    """SIGTERM: refuse new requests, let running and queued ones finish (up to ``grace_s``), exit 0.

    A second signal exits at once.
    """

    def __init__(self, demo: gr.Blocks | None = None, grace_s: float = 30.0) -> None:
        self.demo, self.grace_s, self.stopping = demo, grace_s, False

    def install(self) -> GracefulStop:
        signal.signal(signal.SIGTERM, self)
        return self

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:  # a second signal while draining
            log.info("signal %s again: exiting now", signum)
            os._exit(0)
        if self.demo is None or not getattr(self.demo, "is_running", False):  # still loading
            log.info("signal %s: exiting", signum)
            sys.exit(0)
        self.stopping = True
        had_work = sum(self._pending()) > 0
        log.info("signal %s: refusing new requests; waiting up to %.0f s for %d running and %d queued",
                 signum, self.grace_s, *self._pending())
        queue = self.demo._queue

        async def refuse(*args: Any, **kwargs: Any) -> tuple[bool, str, str]:
            return False, "The server is shutting down; please try again in a minute.", "queue_full"

        queue.push = refuse  # type: ignore[method-assign]
        deadline = time.monotonic() + self.grace_s
        while sum(self._pending()) and time.monotonic() < deadline:
            time.sleep(0.2)
        running, waiting = self._pending()
        if running or waiting:
            log.warning("shutdown grace over: dropping %d running and %d queued requests", running, waiting)
        elif had_work:  # clients fetch result files after the last message: serve until requests stop
            self._until_quiet(quiet_s=1.5, limit_s=max(0.0, min(10.0, deadline - time.monotonic())))
        server = getattr(self.demo, "server", None)
        if getattr(server, "config", None) is not None:  # idle streams (heartbeats) must not hold up
            server.config.timeout_graceful_shutdown = 2  # the exit, nor the deletion of Gradio's files
        self.demo.close()
        log.info("stopped")
        logging.shutdown()
        sys.exit(0)

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
        queue = getattr(self.demo, "_queue", None)
        if queue is None:
            return 0, 0
        running = sum(len(job) for job in getattr(queue, "active_jobs", []) if job)
        try:
            waiting = len(queue)
        except TypeError:
            waiting = 0
        return running, waiting
