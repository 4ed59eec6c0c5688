"""Comparison figures: layout (sizes, nothing overlapping), text kept as text, the untrained note,
columns, and the ``figure`` command end to end."""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import EXAMPLES, ROOT, tiny_resnet, tiny_sa_resnet
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from sanet_viz import charts, figures
from sanet_viz.analysis import AnalysisOptions
from sanet_viz.cli import main
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.preprocessing import prepare
from sanet_viz.weights import IMAGENET_EVAL, EvalTransform, WeightsInfo

A4_TEXT = (170 / 25.4, 240 / 25.4)
SLIDE = (13.333, 7.5)


def tiny_lab(*, pretrained: bool, transform: EvalTransform = IMAGENET_EVAL) -> Lab:
    resnet = tiny_resnet(seed=2)
    info = WeightsInfo("test weights" if pretrained else "untrained (test)", pretrained)
    common = {"probe_layer": "layer4.0", "probe_groups": 64, "transform": transform}
    return Lab({"resnet50": LoadedModel("resnet50", "ResNet50", resnet, info, **common),
                "sanet50": LoadedModel("sanet50", "SANet50", tiny_sa_resnet(seed=3), info, **common)})


@pytest.fixture(scope="module")
def results() -> list:
    lab = tiny_lab(pretrained=False)
    out = []
    for i, path in enumerate(sorted(EXAMPLES.glob("*.jpg"))):
        with Image.open(path) as picture:
            image = prepare(picture.convert("RGB"))
        out.append(figures.explain_for_figure(lab, image, AnalysisOptions(), name=f"{i}-{path.name}",
                                              columns=figures.COLUMNS))
    return out


def texts_of(fig: Figure) -> list[matplotlib.text.Text]:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def overlaps(fig: Figure) -> list[str]:
    """Pairs of visible texts, or a text and a map, whose drawn boxes intersect; texts outside the figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(repr(t.get_text()[:30]), t.get_window_extent(renderer)) for t in texts_of(fig)]
    maps = [(f"map {i}", ax.get_window_extent(renderer)) for i, ax in enumerate(fig.axes) if ax.images]
    whole = fig.bbox
    found = [f"{name} leaves the figure" for name, box in boxes
             if box.x0 < whole.x0 - 1 or box.y0 < whole.y0 - 1 or box.x1 > whole.x1 + 1 or box.y1 > whole.y1 + 1]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes + maps, 2):
        if box_a.overlaps(box_b) and not (a.startswith("map") and b.startswith("map")):
            found.append(f"{a} overlaps {b}")
    return found


@pytest.mark.parametrize("layout", ["slide", "page"])
@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("columns", [figures.DEFAULT_COLUMNS, figures.COLUMNS])
def test_sizes_and_nothing_overlaps(results: list, layout: str, rows: int, columns: tuple[str, ...]) -> None:
    fig = figures.comparison_figure((results * 3)[:rows], columns=columns, layout=layout)
    width, height = fig.get_size_inches()
    if layout == "slide":
        assert (width, height) == pytest.approx(SLIDE, abs=1e-3)  # exactly a 16:9 slide
    else:
        assert width == pytest.approx(A4_TEXT[0], abs=1e-3) and height <= A4_TEXT[1] + 1e-6
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == rows * len(columns)
    sides = {round(ax.get_position().width * width, 6) for ax in maps}
    assert len(sides) == 1 and sides.pop() > (0.9 if layout == "slide" else 0.6)  # one map size, not tiny
    assert overlaps(fig) == []


def test_many_images_go_into_blocks_and_too_many_are_refused(results: list) -> None:
    limits = {(layout, len(columns)): figures.max_images(columns=columns, layout=layout)
              for layout in figures.LAYOUTS for columns in (figures.DEFAULT_COLUMNS, figures.COLUMNS)}
    for (layout, _), limit in limits.items():
        assert limits[(layout, 3)] >= limits[(layout, 4)] >= 8  # a class's worth of examples fits
    many = (results * 10)[:limits[("slide", 4)]]
    fig = figures.comparison_figure(many, columns=figures.COLUMNS, layout="slide")
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 4 * len(many)
    lefts = sorted({round(ax.get_position().x0, 4) for ax in maps})
    assert len(lefts) > 4  # blocks of rows side by side
    with pytest.raises(ValueError, match=f"{len(many) + 1} images do not fit one slide figure of 4 columns"):
        figures.comparison_figure((results * 10)[:len(many) + 1], columns=figures.COLUMNS)


def svg_text(fig: Figure) -> str:
    return figures.svg_bytes(fig).decode()


def test_svg_keeps_text_as_text_and_names_what_each_map_explains(results: list) -> None:
    svg = svg_text(figures.comparison_figure(results[:2], columns=figures.COLUMNS))
    words = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert len(words) > 20
    for r in results[:2]:
        for key in ("resnet50", "sanet50"):
            m = r.models[key]
            p = float(torch.softmax(torch.from_numpy(m.logits), -1)[m.target_class])
            assert f"p = {p:.1%}" in words
            assert m.target_label in words
    assert "0-astronaut.jpg" in words
    assert any("red: SANet50 higher" in w for w in words)  # the difference's colour bar says which sign is which
    assert matplotlib.rcParams["svg.fonttype"] == "path"  # set only while saving


def test_untrained_models_are_named_on_the_figure(results: list) -> None:
    untrained = " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg_text(figures.result_figure(results[0]))))
    assert "UNTRAINED ResNet50 and SANet50" in untrained and "README" in untrained
    assert "ResNet50 (UNTRAINED)" in untrained

    lab = tiny_lab(pretrained=True)
    with Image.open(EXAMPLES / "chelsea.jpg") as picture:
        image = prepare(picture)
    trained = figures.explain_for_figure(lab, image, AnalysisOptions(), name="cat")
    assert "UNTRAINED" not in svg_text(figures.result_figure(trained))


def test_columns_choose_the_models_computed_and_drawn(results: list) -> None:
    lab = tiny_lab(pretrained=False)
    with Image.open(EXAMPLES / "coffee.jpg") as picture:
        image = prepare(picture)
    only_sanet = figures.explain_for_figure(lab, image, AnalysisOptions(), name="cup", columns=("sanet50",))
    assert list(only_sanet.models) == ["sanet50"]
    mr = only_sanet.models["sanet50"]
    assert mr.probe is None and mr.sa_gates is None  # a figure needs neither
    fig = figures.comparison_figure([only_sanet], columns="input, sanet50")
    assert len([ax for ax in fig.axes if ax.images]) == 2
    with pytest.raises(ValueError, match="no resnet50 in this result"):
        figures.comparison_figure([only_sanet], columns="input,difference")
    with pytest.raises(ValueError, match=r"unknown figure column\(s\) gradcam"):
        figures.parse_columns("input,gradcam")
    with pytest.raises(ValueError, match="appears twice"):
        figures.parse_columns("input,sanet50,sanet50")
    assert figures.parse_columns("Input, SANet50,difference") == ("input", "sanet50", "difference")


def test_difference_column_is_sanet_minus_resnet(results: list) -> None:
    r = results[1]
    fig = figures.comparison_figure([r], columns=("difference",))
    (ax,) = [a for a in fig.axes if a.images]
    shown = ax.images[0].get_array()
    expected = figures._diff_overlay(r.display, r.models["sanet50"].cam - r.models["resnet50"].cam, opacity=0.5)
    np.testing.assert_array_equal(np.asarray(shown), expected)
    # Where SANet50's map is much higher the colour leans red, where ResNet50's is, blue.
    diff = r.models["sanet50"].cam - r.models["resnet50"].cam
    red = expected[..., 0].astype(int) - expected[..., 2].astype(int)
    if diff.max() > 0.3:
        assert red[diff == diff.max()].mean() > 0
    if diff.min() < -0.3:
        assert red[diff == diff.min()].mean() < 0


@pytest.mark.parametrize("fmt", figures.FORMATS)
def test_save_writes_each_format(results: list, tmp_path: Path, fmt: str) -> None:
    path = figures.save_figure(figures.comparison_figure(results[:1], layout="page"), tmp_path / f"f.{fmt}", dpi=100)
    data = path.read_bytes()
    if fmt == "png":
        with Image.open(io.BytesIO(data)) as image:
            assert image.width == round(A4_TEXT[0] * 100)
    elif fmt == "pdf":
        assert data.startswith(b"%PDF") and b"/Type3" not in data and b"DejaVuSans" in data  # TrueType text
    else:
        assert b"<text" in data and b"<svg" in data


def test_svg_bytes_of_any_chart(results: list) -> None:
    svg = figures.svg_bytes(charts.overlay_pair(results[0])).decode()
    assert "<text" in svg and "UNTRAINED" in svg
    with pytest.raises(ValueError, match="figure format must be one of"):
        figures.figure_bytes(Figure(), "jpg")


# ------------------------------------------------------------------------------------------
# The command, with untrained full-size models (no weights here)


def cli_env(tmp: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in {"SANET_VIZ_RESNET50", "SANET_VIZ_SANET50"}}
    (tmp / "no-weights").mkdir(exist_ok=True)
    env.update(SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1", SANET_VIZ_WEIGHTS_DIR=str(tmp / "no-weights"),
               TORCH_HOME=str(tmp / "torch-home"), PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return env


def run_figure(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanet_viz", "figure", *args], cwd=ROOT, env=cli_env(tmp),
                          capture_output=True, text=True, timeout=300)


def test_figure_command_refuses_bad_options_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from sanet_viz.lab import Lab as LabClass

    def no_loading(**_: object) -> None:
        raise AssertionError("the models were loaded before the options were checked")

    monkeypatch.setattr(LabClass, "load", no_loading)
    chelsea = str(EXAMPLES / "chelsea.jpg")
    for args, message in ((["--out", str(tmp_path / "f.jpg")], "--out must end in .pdf, .svg, .png"),
                          (["--out", str(tmp_path / "f.pdf"), "--columns", "input,x"], "unknown figure column(s) x"),
                          (["--out", str(tmp_path / "f.png"), "--dpi", "0"], "--dpi must be within"),
                          (["--out", str(tmp_path / "f.png"), "--target-class", "1000"], "target class must be"),
                          ([*[chelsea] * 60, "--out", str(tmp_path / "f.png")], "holds at most")):
        assert main(["figure", chelsea, *args]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("f.*"))


@pytest.mark.slow
def test_figure_command_names_bad_files_and_draws_the_rest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture\n")
    out = tmp_path / "figure.svg"
    proc = run_figure([str(EXAMPLES / "chelsea.jpg"), str(bad), str(EXAMPLES / "rocket.jpg"), "--out", str(out),
                       "--columns", "input,resnet50,sanet50,difference", "--layout", "page"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [part.strip() for line in proc.stderr.splitlines() for part in line.split("\r") if part.strip()]
    assert len([line for line in lines if "bad.jpg" in line and line.startswith("error:")]) == 1
    assert any("wrote" in line and "2 of 3 image(s)" in line for line in lines)
    svg = out.read_text()
    words = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "chelsea.jpg" in words and "rocket.jpg" in words and "bad.jpg" not in words
    assert any("UNTRAINED ResNet50 and SANet50" in w for w in words)
    assert svg.count("<image") == 2 * 4 + 2  # 2 rows x 4 columns, and the two colour bars
