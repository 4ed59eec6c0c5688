"""Writing one analysis to a folder: result.json (the contract), CAM arrays and pictures."""

from __future__ import annotations

import io
import json
import queue
import threading
import zipfile
from pathlib import Path
from types import TracebackType

import numpy as np

from . import charts
from .results import AnalysisResult

__all__ = ["write_result", "zip_folder", "BackgroundWriter", "RESULT_FILE"]

RESULT_FILE = "result.json"


def write_result(result: AnalysisResult, folder: str | Path, *, opacity: float = 0.5) -> dict[str, object]:
    """Write everything for ``result`` into ``folder``; returns the result.json dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cam_files = {}
    for key, m in result.models.items():
        name = f"cam_{key}.npy"
        np.save(folder / name, m.cam.astype(np.float32))
        cam_files[key] = name
    charts.save(charts.overlay_pair(result, opacity=opacity), str(folder / "overlays.png"))
    pictures = {"overlays": "overlays.png"}
    if any(m.probe is not None for m in result.models.values()):
        charts.save(charts.probe_chart(result), str(folder / "probe.png"))
        pictures["probe"] = "probe.png"
    sanet = next((m for m in result.models.values() if m.sa_gates is not None), None)
    grid_source = sanet or next(iter(result.models.values()))
    charts.save(charts.group_grid(grid_source.group_maps, title=f"{grid_source.display_name}: 64 group maps "
                                  f"of {grid_source.probe.paper_name if grid_source.probe else 'layer4.2'}"),
                str(folder / "groups.png"))
    pictures["groups"] = "groups.png"
    pictures.update(_gates_pictures(result, folder))
    pictures.update(_faithfulness_pictures(result, folder))
    data = result.to_dict(cam_files)
    data["files"] = pictures
    (folder / RESULT_FILE).write_text(json.dumps(data, indent=2))
    return data


def _gates_pictures(result: AnalysisResult, folder: Path) -> dict[str, str]:
    """Each gated model's gates: gates.png for SA (as always), gates_<key>.png for SE and ECA, and
    gates_across_depth.png when two models have gates (both on one axis of depth)."""
    pictures = {}
    for key, m in result.models.items():
        name = "gates" if m.sa_gates else f"gates_{key}"
        fig = charts.model_gates_chart(m)
        if fig is not None:
            charts.save(fig, str(folder / f"{name}.png"))
            pictures[name] = f"{name}.png"
    if sum(m.gates is not None for m in result.models.values()) > 1:
        charts.save(charts.gates_across_depth(list(result.models.values())), str(folder / "gates_across_depth.png"))
        pictures["gates_across_depth"] = "gates_across_depth.png"
    return pictures


def _faithfulness_pictures(result: AnalysisResult, folder: Path) -> dict[str, str]:
    """faithfulness.png (deletion and insertion curves) and randomization.png (the cascade), when measured."""
    measured = {m.display_name: m.faithfulness for m in result.models.values() if m.faithfulness is not None}
    if not measured:
        return {}
    untrained = [m.display_name for m in result.models.values() if not m.weights.pretrained]
    pictures = {"faithfulness": "faithfulness.png"}
    charts.save(charts.faithfulness_curves({name: (f.deletion, f.insertion) for name, f in measured.items()},
                                           untrained=untrained, title=f"{result.image_name}: faithfulness of the CAMs"),
                str(folder / pictures["faithfulness"]))
    cascades = {name: f.randomization for name, f in measured.items() if f.randomization is not None}
    if cascades:
        pictures["randomization"] = "randomization.png"
        charts.save(charts.randomization_chart(cascades, untrained=untrained), str(folder / pictures["randomization"]))
    return pictures


def zip_folder(folder: str | Path) -> bytes:
    """The folder's files as a zip archive (for the app's download)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                archive.write(path, path.name)
    return buffer.getvalue()


class BackgroundWriter:
    """:func:`write_result` on one background thread, in the order submitted, while the caller
    computes the next result: a CLI run over many images keeps pictures and files off its
    critical path. The files are exactly those that :func:`write_result` writes.

    At most ``max_pending`` results wait (``submit`` blocks while the queue is full), so memory
    stays bounded. An error in the writer is raised in the caller, by the next ``submit`` or by
    ``close`` (leaving the ``with`` block): nothing submitted after it is written. ``close`` first
    writes every result already submitted, also when the caller is leaving on an exception.
    Charts are drawn on plain matplotlib Figures (no pyplot state), so the thread is safe.
    """

    def __init__(self, *, max_pending: int = 2, opacity: float = 0.5) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._opacity = opacity
        self._queue: queue.Queue[tuple[AnalysisResult, Path] | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._failed = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="sanet-viz-writer", daemon=True)
        self._thread.start()

    def submit(self, result: AnalysisResult, folder: str | Path) -> None:
        """Queue ``result`` to be written into ``folder``; raises an earlier write's error."""
        if self._closed:
            raise RuntimeError("this writer is closed")
        self._raise_error()
        self._queue.put((result, Path(folder)))

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise the first write error if any."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # the caller's exception wins; a write error then is its context, not lost
            self.close()
        except Exception as write_error:  # noqa: BLE001 - kept as a note on the caller's exception
            exc.add_note(f"writing results in the background also failed: {write_error!r}")

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failed:
                continue  # keep draining so that submit() never blocks on a dead writer
            try:
                write_result(*item, opacity=self._opacity)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
                self._error, self._failed = exc, True
