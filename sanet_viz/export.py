"""Writing one analysis to a folder: result.json (the contract), CAM arrays and pictures."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from . import charts
from .results import AnalysisResult

__all__ = ["write_result", "zip_folder", "RESULT_FILE"]

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
    if sanet is not None and sanet.sa_gates:
        charts.save(charts.gates_heatmap(sanet.sa_gates, title=f"{sanet.display_name}: SA gates across depth"),
                    str(folder / "gates.png"))
        pictures["gates"] = "gates.png"
    pictures.update(_faithfulness_pictures(result, folder))
    data = result.to_dict(cam_files)
    data["files"] = pictures
    (folder / RESULT_FILE).write_text(json.dumps(data, indent=2))
    return data


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
