"""The app's handlers called directly, without a server: tiny models, real Blocks, dict outputs."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from conftest import EXAMPLES, tiny_resnet, tiny_sa_resnet

from sanet_viz import models
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.ui import AppSettings, Session, build_demo
from sanet_viz.weights import WeightsInfo

LAYER = "layer4.0"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lab(*, constant_gates: bool = False) -> Lab:
    resnet = tiny_resnet()
    sanet = (models.SAResNet([1, 1, 1, 1], num_classes=10, sa_groups=4, planes=(8, 16, 32, 64)).eval()
             if constant_gates else tiny_sa_resnet())  # the paper's 0/1 init: every gate is sigmoid(1)
    info = WeightsInfo("untrained (test)", False, note="test models")
    return Lab({"resnet50": LoadedModel("resnet50", "Tiny ResNet", resnet, info, probe_layer=LAYER, probe_groups=64),
                "sanet50": LoadedModel("sanet50", "Tiny SANet", sanet, info, probe_layer=LAYER, probe_groups=64)})


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = AppSettings(output_dir=tmp_path_factory.mktemp("outputs"))
    demo = build_demo(tiny_lab(), settings)
    return demo.handlers


def last(messages: Iterator[dict[Any, Any]]) -> list[dict[Any, Any]]:
    return list(messages)


def merged(messages: list[dict[Any, Any]]) -> dict[Any, Any]:
    """What the page shows after all messages: later values win."""
    out: dict[Any, Any] = {}
    for m in messages:
        out.update(m)
    return out


def analyse(h: Any, session: Session, method: str = "gradcam", target: str = "predicted",
            path: Path | None = EXAMPLES / "chelsea.jpg") -> list[dict[Any, Any]]:
    return last(h.analyse(str(path) if path else None, method, target, LAYER, 0.5, False, False, session))


def test_analyse_fills_every_view_and_the_last_message_is_complete(app: Any) -> None:
    p = app.page
    session = Session()
    messages = analyse(app, session)
    final = messages[-1]
    for slot in ("left", "right"):  # the Compare tab's places (ResNet50, SANet50 by default)
        image = final[p.compare.images[slot]]
        assert isinstance(image, np.ndarray) and image.shape == (224, 224, 3)
        assert "untrained" in final[p.compare.top5[slot]].lower()  # every headline of an untrained model says so
    data = final[p.download.result_json]
    assert set(data["models"]) == {"resnet50", "sanet50"}
    assert data["models"]["sanet50"]["cam"]["class_agnostic"] is False
    assert data["models"]["sanet50"]["group_probe"] is not None and data["models"]["resnet50"]["group_probe"] is None
    assert Path(final[p.download.archive]).is_file()
    assert "<img" in final[p.groups.probe] and final[p.groups.probe].count('data-group="') == 64
    assert final[p.groups.grid].count('data-group="') == 64
    # The first message clears what an earlier picture left.
    assert messages[0][p.compare.images["right"]] is None and messages[0][p.download.result_json] is None


def test_eigencam_says_the_class_has_no_effect(app: Any) -> None:
    p = app.page
    chosen = merged(analyse(app, Session(), "eigencam", "3"))
    predicted = merged(analyse(app, Session(), "eigencam", "predicted"))
    assert chosen[p.download.result_json]["models"]["sanet50"]["cam"]["class_agnostic"] is True
    assert "ignores the class" in chosen[p.compare.captions["right"]]
    np.testing.assert_array_equal(chosen[p.compare.images["right"]], predicted[p.compare.images["right"]])


def test_slow_method_in_a_page_is_estimated_then_completed_in_its_own_lane(app: Any) -> None:
    p = app.page
    session = Session(page=True)
    fast = merged(analyse(app, session, "scorecam"))
    assert fast[p.compare.images["right"]] is None, "old or pending heatmaps are not shown as current"
    assert "masked forwards" in fast[p.compare.status] and "Cancel" in fast[p.compare.status]
    assert fast[p.controls.cancel]["visible"] is True
    assert p.download.result_json not in fast or fast[p.download.result_json] is None
    slow = last(app.complete_slow(0.5, session))
    progress = [m[p.compare.captions[k]] for m in slow for k in ("left", "right")
                if p.compare.captions[k] in m and "of" in str(m[p.compare.captions[k]])]
    assert progress, "the panel being computed shows its progress"
    final = slow[-1]
    assert isinstance(final[p.compare.images["right"]], np.ndarray)
    assert final[p.download.result_json]["models"]["sanet50"]["cam"]["method"] == "scorecam"


def test_cancel_stops_a_slow_method_and_a_new_click_replaces_it(app: Any) -> None:
    p = app.page
    session = Session(page=True)
    merged(analyse(app, session, "scorecam"))
    out = app.cancel(session)
    assert "Cancelled" in out[p.compare.status] and out[p.controls.cancel]["visible"] is False
    assert all(value == gr.skip() for m in last(app.complete_slow(0.5, session)) for value in m.values())
    assert session.result is not None and session.result.models["sanet50"].cam is None
    # A new analysis replaces a running one: the old run's checks now fail.
    run = session.start()
    check = session.checker(run - 1)
    with pytest.raises(Exception, match="newer request"):
        check()


def test_a_non_picture_is_refused_at_upload_and_stale_results_cleared(app: Any, tmp_path: Path) -> None:
    p = app.page
    session = Session()
    analyse(app, session)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture at all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = app.new_image(str(text), session)
    assert any("notes.jpg" in str(w.message) and "not a picture" in str(w.message) for w in caught)
    assert out[p.controls.image] is None and "notes.jpg" in out[p.compare.status]
    assert out[p.compare.images["right"]] is None and out[p.download.result_json] is None
    assert session.result is None and session.image is None
    with pytest.raises(gr.Error, match="Add an image first"):
        analyse(app, session, path=None)


def test_controls_views_and_groups(app: Any) -> None:
    p = app.page
    session = Session()
    final = analyse(app, session)[-1]
    crop = final[p.compare.images["right"]]
    whole = app.rerender(0.5, "whole photo (crop outlined)", session)[p.compare.images["right"]]
    assert whole.shape[:2] == session.image.preview.shape[:2] != crop.shape[:2]
    faint = app.rerender(0.1, "centre crop (what the models see)", session)[p.compare.images["right"]]
    assert faint.shape == crop.shape and not np.array_equal(faint, crop)
    opened = app.select_group(5, session)
    assert "**Chunk 5**" in opened[p.groups.detail_text] and opened[p.groups.group] == 5
    assert 'data-group="5" title' in opened[p.groups.probe] and "hit sel" in opened[p.groups.grid]
    by_score = app.resort("by score", session)[p.groups.probe]
    assert "groups sorted by score" in by_score and "bars sorted by score" in by_score
    svg = base64.b64decode(by_score.split("base64,")[1].split('"')[0]).decode()
    assert svg.count("<rect") == 65  # the background and 64 bars


def test_correlation_of_constant_gates_is_undefined_not_a_number(tmp_path: Path) -> None:
    h = build_demo(tiny_lab(constant_gates=True), AppSettings(output_dir=tmp_path)).handlers
    c = h.page.correlation
    files = [str(EXAMPLES / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    out = h.correlate(files, "cat\ncup\nrocket")
    numbers = out[c.numbers]
    assert len(numbers["depths"]) == 4 and numbers["classes"] == ["cat", "cup", "rocket"]
    assert numbers["mean_between_class_correlation"] == [None] * 4
    assert all("constant" in reason for reason in numbers["undefined"].values())
    assert all(v is None for m in numbers["matrices"].values() for row in m for v in row)
    assert "Undefined at 4 of 4 depths" in out[c.message]


def test_download_makes_the_figure_and_every_chart_as_svg(app: Any) -> None:
    session = Session()
    analyse(app, session)
    files = [Path(f) for f in app.make_figures("page", True, 0.5, session)[app.page.download.figures]]
    names = {f.name for f in files}
    assert {"chelsea-figure-page.pdf", "chelsea-figure-page.svg", "chelsea-figure-page.png"} <= names
    assert {"chelsea-overlays.svg", "chelsea-probe.svg", "chelsea-groups.svg", "chelsea-gates.svg"} <= names
    svg = next(f for f in files if f.name == "chelsea-figure-page.svg").read_text()
    assert "<text" in svg and "UNTRAINED" in svg
    with pytest.raises(gr.Error, match="Analyse an image first"):
        app.make_figures("slide", False, 0.5, Session())


def test_faithfulness_tab_measures_both_maps_and_says_how_far_to_trust_them(app: Any) -> None:
    f, d = app.page.faithfulness, app.page.download
    session = Session()
    analyse(app, session)
    final = last(app.measure(0.5, session))[-1]
    assert "favour no map" in final[f.verdict] and "UNTRAINED" in final[f.verdict]
    assert isinstance(final[f.curves], np.ndarray) and "deletion AUC" in final[f.road]
    for key in ("resnet50", "sanet50"):
        measures = final[d.result_json]["models"][key]["faithfulness"]
        assert len(measures["deletion"]["scores"]) == 33 and measures["randomization"] is None
    cascade = last(app.randomize(0.5, session))[-1]
    assert isinstance(cascade[f.cascade], np.ndarray) and isinstance(cascade[f.strips], np.ndarray)
    steps = cascade[d.result_json]["models"]["sanet50"]["faithfulness"]["randomization"]["steps"]
    assert steps[0] == "fc" and steps[-1] == "stem"
    with pytest.raises(gr.Error, match="Analyse an image first"):
        last(app.measure(0.5, Session()))


def test_events_with_nothing_to_do_change_nothing(app: Any) -> None:
    """Gradio turns a generator that yields nothing into None for every output, which blanks what
    the page shows; such events say "no change" instead."""
    session = Session()
    analyse(app, session)
    for messages in (list(app.complete_slow(0.5, session)), list(app.add_resnet_probe(False, 0.5, session))):
        assert len(messages) == 1 and messages[0]
        assert all(value == gr.skip() for value in messages[0].values())
    before = Session()  # nothing analysed yet: moving a control changes nothing
    for out in (app.rerender(0.3, "whole photo (crop outlined)", before), app.select_group(3, before),
                app.resort("by score", before)):
        assert out and all(value == gr.skip() for value in out.values())


def test_the_pages_analyse_sends_the_compare_tab_first_and_the_rest_from_a_chained_event(tmp_path: Path) -> None:
    demo = build_demo(tiny_lab(), AppSettings(output_dir=tmp_path))
    app = demo.handlers
    p = app.page
    compare, rest = set(p.compare_outputs()), set(p.rest_outputs())
    api = [f for f in demo.fns.values() if f.api_name == "analyze"]
    assert len(api) == 1 and not api[0].targets and len(api[0].outputs) == len(p.analysis_outputs()), \
        "/analyze: one event with every output and no trigger on the page"
    clicked = [f for f in demo.fns.values() if any(t[0] == p.controls.analyse._id for t in f.targets)]
    assert len(clicked) == 1 and set(clicked[0].outputs) == compare and len(compare) < len(rest) + 3

    session = Session(page=True)
    whole = merged(analyse(app, Session(page=True)))  # what the API (one event) ends with
    first = last(app.analyse_page(str(EXAMPLES / "chelsea.jpg"), "gradcam", "predicted", LAYER, 0.5, False, False,
                                  session))
    assert all(set(m) <= compare for m in first)
    assert isinstance(merged(first)[p.compare.images["right"]], np.ndarray) and session.rest is not None
    then = last(app.continue_analysis(session))
    assert all(set(m) <= rest for m in then) and session.rest is None
    assert then[0][p.download.result_json] is None and p.controls.cancel not in then[0], \
        "an earlier result's downloads go at once; Cancel stays as the heatmaps left it"
    page = merged(first + then)
    assert set(page) == set(whole)
    assert page[p.groups.grid].count('data-group="') == 64 and page[p.download.result_json]["models"].keys() == \
        whole[p.download.result_json]["models"].keys()
    again = last(app.continue_analysis(session))  # taken once: a second continuation changes nothing
    assert len(again) == 1 and all(value == gr.skip() for value in again[0].values())
