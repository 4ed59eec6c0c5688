"""Handing memory back to the system after requests (glibc's ``malloc_trim``).

A request's activations (hundreds of MB for the probes' batches) are freed when it ends, but
glibc keeps freed memory in its arenas (one per thread that allocated, up to 8 per core), so the
resident size stays at its high-water mark: measured here, an analysis left 40 to 190 MB behind
each time, and ``malloc_trim(0)`` returned all of it (no tensor outlived the request, and
``gc.collect`` found nothing to free; see docs/limits.md, "Memory"). The server calls
:func:`release_memory` whenever a request ends (:class:`MemoryReleaser`). Elsewhere than glibc
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
import threading
from collections.abc import Callable

import gradio as gr

from .shutdown import pending_requests

__all__ = ["release_memory", "MemoryReleaser"]

log = logging.getLogger("sanet-viz")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Return the free memory of every malloc arena to the system; False where there is no
    ``malloc_trim`` (not glibc). Safe while other threads allocate: glibc locks each arena."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryReleaser(threading.Thread):
    """Calls :func:`release_memory` after requests end.

    It polls ``demo``'s queue every ``every_s`` seconds (so the request handlers need no hook)
    and trims when the number of running requests fell or the queue counted more finished ones
    (a short request may start and end between two polls). A trim takes a few milliseconds.
    """

    def __init__(self, demo: gr.Blocks, every_s: float = 0.5) -> None:
        super().__init__(name="sanet-viz memory releaser", daemon=True)
        self.demo, self.every_s = demo, every_s
        self.stopped = threading.Event()
        self.releases = 0

    def run(self) -> None:
        if _malloc_trim() is None:
            log.info("memory: no malloc_trim here (not glibc); freed memory stays with the allocator")
            return
        before = (0, 0)
        while not self.stopped.wait(self.every_s):
            now = (pending_requests(self.demo)[0], self._finished())
            if now[0] < before[0] or now[1] > before[1]:
                release_memory()
                self.releases += 1
            before = now

    def _finished(self) -> int:
        """Requests the queue has finished so far (Gradio's per-function process-time counts)."""
        times = getattr(getattr(self.demo, "_queue", None), "process_time_per_fn", None) or {}
        return sum(getattr(t, "count", 0) for t in times.values())
