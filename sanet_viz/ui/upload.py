"""The image input: Gradio's Image component, with the uploaded file handed to our decoder as sent."""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import Any

import gradio as gr

__all__ = ["UploadedImage"]


class UploadedImage(gr.Image):
    """``gr.Image`` whose upload reaches our decoder as the file that was sent.

    Gradio's own preprocessing opens the upload with PIL and converts its mode: a file that is not
    a picture fails there with an unclear error, and 16-bit or transparent pictures are changed
    before we see them. Here the uploaded path goes through untouched, so
    :func:`preprocessing.decode_image` decides and names the file in its message. The browser
    side is the usual Image component: as a Gradio template it keeps gr.Image's block name and
    constructor (whose parameters are the props the browser gets).
    """

    is_template = True
    max_bytes: int | None = None  # for pictures pasted as data URLs; set after construction

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload: Any) -> str | None:  # type: ignore[override]
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:"):  # a pasted or webcam picture sent inline
            return self._save_data_url(url)
        if not getattr(payload, "path", None):
            raise gr.Error("The upload did not arrive; please add the image again.",
                           print_exception=False)
        return str(payload.path)

    def _save_data_url(self, url: str) -> str:
        body = url.partition(",")[2]
        if self.max_bytes is not None and len(body) * 3 // 4 > self.max_bytes:
            raise gr.Error(f"pasted image: over the upload limit of {self.max_bytes / 2**20:g} MiB; "
                           "please save it smaller (JPEG) and add it again",
                           print_exception=False)
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise gr.Error("pasted image: not valid base64 data", print_exception=False) from None
        folder = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "pasted-image"
        path.write_bytes(data)
        self.temp_files.add(str(path))  # deleted on schedule (Blocks delete_cache, app.py's janitor)
        return str(path)
