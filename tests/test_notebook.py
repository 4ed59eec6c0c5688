"""The notebook API (sanet_viz.notebook) and the lesson (examples/teaching.ipynb).

The API must give the numbers the CLI writes; the lesson must run top to bottom, on untrained
weights, in a kernel of this interpreter, and show its pictures inline. The lesson runs on the
narrow copies of the models (tests/narrow_models.py: every module name, block and group count kept),
which turns two minutes of full-size forwards on 2 cores into seconds; the full-size architectures
are checked against the official code in test_models.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
from conftest import EXAMPLES, ROOT
from matplotlib.figure import Figure

from sanet_viz import notebook
from sanet_viz.cli import main

LESSON = ROOT / "examples" / "teaching.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Untrained, seeded models: no weights folder, no torch hub cache, no downloads."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    monkeypatch.setenv("SANET_VIZ_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for key in ("SANET_VIZ_RESNET50", "SANET_VIZ_SANET50", "SANET_VIZ_PRECISION"):  # a user's defaults
        monkeypatch.delenv(key, raising=False)
    return folder


def without_timings(data: Any) -> Any:
    """result.json minus what differs between two runs (times) or between writers (file names)."""
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k not in {"timings_ms", "file", "files"}}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_api_gives_the_numbers_of_the_cli(no_weights: Path, tmp_path: Path) -> None:
    # Without the probe: its path (analysis.add_probes) is the same for both and the tiny-lab test
    # below checks the API's probe options; two full probes would cost minutes on a loaded CPU.
    image = EXAMPLES / "chelsea.jpg"
    out = tmp_path / "out"
    options = ["--method", "gradcam++", "--target-class", "281", "--layer", "SA_5_2", "--no-probe"]
    assert main(["analyze", str(image), "--out", str(out), *options]) == 0
    written = json.loads((out / "chelsea" / "result.json").read_text())

    lab = notebook.load(verbose=False)
    assert lab.untrained == ["ResNet50", "SANet50"]
    result = lab.analyze(image, method="gradcam++", target_class=281, layer="SA_5_2", probe=False)
    assert_same(without_timings(result.to_dict()), without_timings(written))
    assert result.to_dict()["models"]["sanet50"]["cam"]["layer"] == "layer4.1"  # options reached the analysis
    for key in ("resnet50", "sanet50"):
        np.testing.assert_allclose(result.cam(key), np.load(out / "chelsea" / f"cam_{key}.npy"), atol=1e-6)

    # Shows itself (both heatmaps, their top-5) and gives each view as a figure pyplot has forgotten.
    assert result._repr_png_().startswith(PNG_SIGNATURE)
    assert "UNTRAINED" in repr(result) and "UNTRAINED" in repr(lab)
    views = [result.overlays(), result.groups(), result.gates(), result.gates_by_depth(),
             result.figure(columns="input,sanet50,difference")]
    assert all(isinstance(v, Figure) for v in views)
    assert plt.get_fignums() == []
    saved = result.save(tmp_path / "saved")
    assert_same(without_timings(saved), without_timings(written))


def test_api_runs_the_analysis_with_the_cli_options_on_any_lab() -> None:
    from test_figures import tiny_lab

    from sanet_viz.analysis import AnalysisOptions, analyze
    from sanet_viz.weights import EvalTransform

    small = EvalTransform(resize_size=72, crop_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    lab = notebook.NotebookLab(tiny_lab(pretrained=False, transform=small))
    with pytest.raises(ValueError, match="unknown CAM method 'gradcamm'"):
        lab.analyze(EXAMPLES / "coffee.jpg", method="gradcamm")
    with pytest.raises(ValueError, match="target class must be one of the models' 10 classes"):
        lab.analyze(EXAMPLES / "coffee.jpg", target_class=10)

    result = lab.analyze(EXAMPLES / "coffee.jpg", precision="fp32", target_class=3, probe_models=["sanet50"])
    direct = analyze(lab.lab, lab.lab.prepare(EXAMPLES / "coffee.jpg"),
                     AnalysisOptions(precision="fp32", target_class=3, probe_models=("sanet50",), num_classes=10),
                     name="coffee.jpg")
    assert_same(without_timings(result.to_dict()), without_timings(direct.to_dict()))
    assert result.models["resnet50"].probe is None and result.models["sanet50"].probe is not None

    assert result._repr_png_().startswith(PNG_SIGNATURE)
    assert isinstance(result.probe(), Figure) and plt.get_fignums() == []
    other = lab.analyze(EXAMPLES / "rocket.jpg", probe=False)
    fig = lab.figure([result, other, EXAMPLES / "chelsea.jpg"], columns="input,resnet50,sanet50,difference")
    assert len([ax for ax in fig.axes if ax.images]) == 3 * 4
    with pytest.raises(ValueError, match="this result has no probe"):
        other.probe()


def test_the_committed_lesson_has_no_outputs() -> None:
    lesson = nbformat.read(LESSON, as_version=4)
    nbformat.validate(lesson)
    code = [c for c in lesson.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    text = "\n".join(c.source for c in lesson.cells)
    assert "untrained" in text.lower() and "Weights" in text  # says what untrained means and where to go


def kernel_for_this_interpreter(folder: Path) -> str:
    """A kernelspec in ``folder`` (found through $JUPYTER_PATH) that runs this Python: the venv's."""
    name = "sanet-viz-test"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sanet-viz (test)", "language": "python"}))
    return name


NARROW_STARTUP = """
# Test harness (tests/test_notebook.py): once the lesson has imported sanet_viz itself, point the
# model registry at tests/narrow_models.py's narrow copies (same module names, block and group
# counts; a fraction of the compute). Nothing is put on the path before that, so the lesson's own
# way of finding the package is still what is tested.
import sys


def _use_narrow_models(result):
    if "sanet_viz.weights" in sys.modules and "narrow_models" not in sys.modules:
        sys.path.append({tests!r})
        import narrow_models

        narrow_models.use_narrow_models()
        print("(test harness: narrow models)")


get_ipython().events.register("post_run_cell", _use_narrow_models)
"""


def narrow_kernel(ipython_dir: Path) -> None:
    """An IPython startup file in ``ipython_dir`` that gives the lesson's kernel the narrow models."""
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-narrow-models.py").write_text(NARROW_STARTUP.format(tests=str(Path(__file__).parent)))


@pytest.mark.slow
def test_the_lesson_runs_top_to_bottom(no_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    jupyter = tmp_path / "jupyter"
    kernel = kernel_for_this_interpreter(jupyter)
    # Nothing in the user's home: kernelspecs, connection files and IPython's profile live here.
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(jupyter / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks Jupyter's inline backend
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the lesson finds the package itself

    narrow_kernel(tmp_path / "ipython")

    lesson = nbformat.read(LESSON, as_version=4)
    client = NotebookClient(lesson, kernel_name=kernel, timeout=600,
                            resources={"metadata": {"path": str(LESSON.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell raises

    outputs = [o for c in lesson.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 8  # part 1's two plots, heatmaps, the figure, probe, groups, gates
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "UNTRAINED: ResNet50, SANet50" in printed
    assert printed.count("(test harness: narrow models)") == 1  # set once, before the models were built
    assert "by hand == sa(x): True" in printed
    assert "Every gate is 0.7311" in printed
    assert "The correlation is undefined at 16 of 16 depths" in printed  # and no numbers shown as findings
