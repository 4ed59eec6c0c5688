"""Environment defaults the server needs before Gradio is imported (Gradio reads them then)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["prepare_environment", "gradio_temp_dir"]


def prepare_environment() -> None:
    """No analytics calls; a temp folder of our own for uploads and outputs (not /tmp/gradio,
    which other apps may share): the janitor deletes what is older than --cache-ttl there."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "sanet-viz-gradio"))


def gradio_temp_dir() -> Path:
    """The folder Gradio serves uploads and outputs from."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
