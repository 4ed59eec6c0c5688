"""Deleting old uploads and outputs from the server's temp folder."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import gradio as gr

__all__ = ["CacheJanitor"]

log = logging.getLogger("sanet-viz")


class CacheJanitor(threading.Thread):
    """Deletes files older than ``ttl_s`` from Gradio's temp folder, every ``every_s`` seconds.

    Gradio's own ``delete_cache`` only knows the files it tracked, and it loses track of outputs
    of components that a generator updated with ``gr.update()`` (the /analyze outputs: overlays,
    charts, the zip), which would then stay forever. Copies of the examples are kept.
    """

    def __init__(self, demo: gr.Blocks, folder: Path, ttl_s: float, every_s: float) -> None:
        super().__init__(name="sanet-viz cache janitor", daemon=True)
        self.demo, self.folder, self.ttl_s, self.every_s = demo, folder, ttl_s, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.sweep()

    def sweep(self) -> int:
        keep = {str(p) for block in getattr(self.demo, "blocks", {}).values()
                for p in getattr(block, "keep_in_cache", ())}
        cutoff, removed = time.time() - self.ttl_s, 0
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            try:
                if path.is_symlink() or path.is_file():
                    st = path.lstat()
                    if str(path) not in keep and max(st.st_mtime, st.st_ctime) < cutoff:
                        path.unlink()
                        removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:
                pass  # gone already, or in use
        if removed:
            log.info("cache: deleted %d file(s) older than %.0f s from %s", removed, self.ttl_s, self.folder)
        return removed
