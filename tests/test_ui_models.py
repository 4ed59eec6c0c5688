"""The app compares any two offered models (issue 20's app): the pool that loads a model on its
first pick, the pickers, headings that follow the pair, the right model's probe and the left's on
demand, gates with their own unit across depth, class correlation for every gated model, the
API's optional pair, faithfulness and downloads; all without a server, on tiny models."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import timm
import torch
from conftest import EXAMPLES, tiny_resnet, tiny_sa_resnet
from test_attention_models import lively

from sanet_viz import charts
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.ui import AppSettings, ModelPool, Session, build_demo, weights_banner
from sanet_viz.ui.pool import Expected, PairError
from sanet_viz.weights import TIMM_BICUBIC_EVAL, WeightsInfo

LAYER = "layer4.0"
CHELSEA = str(EXAMPLES / "chelsea.jpg")

pytestmark = pytest.mark.usefixtures("one_thread")

INFO = WeightsInfo("untrained (test)", False, note="test models")


def tiny_se() -> LoadedModel:
    """A small timm SE-ResNet (bicubic preprocessing, as the registry's entry), its gates lively;
    narrow stages (a full-width one made the faithfulness and figure tests slow)."""
    torch.manual_seed(0)
    se = lively(timm.create_model("seresnet18", pretrained=False, num_classes=10, channels=(16, 16, 32, 64),
                                  stem_width=16))
    return LoadedModel("seresnet50", "Tiny SE", se, INFO, probe_layer="layer4.1", probe_groups=64,
                       transform=TIMM_BICUBIC_EVAL)


def tiny_start() -> dict[str, LoadedModel]:
    resnet = tiny_resnet()
    return {"resnet50": LoadedModel("resnet50", "Tiny ResNet", resnet, INFO, probe_layer=LAYER, probe_groups=64),
            "sanet50": LoadedModel("sanet50", "Tiny SANet", tiny_sa_resnet(), INFO, probe_layer=LAYER,
                                   probe_groups=64)}


class Loader:
    """Loads the tiny SE on demand, slowly enough for a second visitor to arrive meanwhile."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, key: str) -> LoadedModel:
        self.calls.append(key)
        time.sleep(0.3)
        return tiny_se()


@pytest.fixture(scope="module")
def loader() -> Loader:
    return Loader()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, loader: Loader) -> Any:
    pool = ModelPool(("resnet50", "sanet50", "seresnet50"), tiny_start(), loader=loader,
                     expected={"seresnet50": Expected(True, "hf://timm/seresnet50.ra2_in1k (test)")})
    return build_demo(pool, AppSettings(output_dir=tmp_path_factory.mktemp("outputs"))).handlers


def merged(messages: Iterator[dict[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for m in messages:
        out.update(m)
    return out


def pick(h: Any, left: str, right: str, session: Session, *, probe_left: bool = False,
         path: str | None = CHELSEA) -> list[dict[Any, Any]]:
    return list(h.pick(left, right, path, "gradcam", "predicted", LAYER, 0.5, probe_left, False, session))


def analysed(h: Any, session: Session) -> None:
    """A picture prepared and analysed with the visitor's pair."""
    list(h.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, session))


def assert_models_as_found(pool: ModelPool) -> None:
    """No hook left, eval mode, frozen and no gradients on every loaded model (and its copy)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for lm in pool.models.values():
        for net in (lm.model, lm.fast_model):
            if net is None:
                continue
            assert not any(getattr(m, kind) for m in net.modules() for kind in kinds), lm.key
            assert not any(m.training for m in net.modules()), lm.key
            assert not any(p.requires_grad or p.grad is not None for p in net.parameters()), lm.key


def test_the_pool_loads_a_model_once_on_first_use_and_never_changes_a_snapshot() -> None:
    loads = Loader()
    pool = ModelPool(("resnet50", "sanet50", "seresnet50"), tiny_start(), loader=loads)
    before = pool.models
    assert pool.start == ("resnet50", "sanet50") and pool.missing(("sanet50", "seresnet50")) == ["seresnet50"]
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("seresnet50"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads.calls == ["seresnet50"] and got[0] is got[1] is got[2], "one load, shared by every visitor"
    assert set(before) == {"resnet50", "sanet50"}, "a visitor's snapshot never changes under it"
    assert set(pool.models) == {"resnet50", "sanet50", "seresnet50"}
    assert pool.label("seresnet50") == "Tiny SE (untrained)"
    with pytest.raises(PairError, match="different models"):
        pool.pair("sanet50,sanet50")
    with pytest.raises(PairError, match="not offered"):
        ModelPool(("resnet50", "sanet50"), tiny_start()).pair("sanet50,seresnet50")
    with pytest.raises(ValueError, match="at least two"):
        ModelPool(("sanet50",), tiny_start())


def test_a_lab_of_two_gives_todays_app_without_pickers(tmp_path: Path) -> None:
    demo = build_demo(Lab(tiny_start()), AppSettings(output_dir=tmp_path))
    h = demo.handlers
    c = h.page.compare
    config = {b["id"]: b for b in demo.config["components"]}
    row = next(b for b in config.values() if b.get("props", {}).get("elem_id") == "model-pickers")
    assert row["props"]["visible"] is False, "two models offered: nothing to pick"
    assert c.images["left"].label == "Tiny ResNet" and c.images["right"].elem_id == "overlay-sanet50"
    assert c.difference.label == "Tiny SANet minus Tiny ResNet"
    assert h.page.groups.probe_resnet.label == "Also probe Tiny ResNet (takes as long again)"
    assert "Tiny ResNet has no attention modules" in h.page.depth.about.value
    # Across depth as before pairs: SANet50's heatmaps, and its mean gates per module.
    session = Session()
    out = merged(h.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, session))
    sanet = session.result.models["sanet50"]
    np.testing.assert_array_equal(out[h.page.depth.lines], charts.to_image(charts.gates_lines(sanet.sa_gates)))
    np.testing.assert_array_equal(out[h.page.depth.heatmap], charts.to_image(charts.model_gates_chart(sanet)))


def test_picking_a_model_loads_it_names_the_pair_and_analyses_again(app: Any, loader: Loader) -> None:
    p, c = app.page, app.page.compare
    session = Session(page=True)
    analysed(app, session)
    assert "seresnet50" not in app.pool.models and loader.calls == []
    assert "**SE-ResNet50** (loads on first use): from hf://" in weights_banner(app.pool)[1]  # its registry name
    messages = pick(app, "sanet50", "seresnet50", session)
    assert any("Loading SE-ResNet50 (first use" in str(m.get(c.status, "")) for m in messages), "said before it loads"
    assert loader.calls == ["seresnet50"] and session.pair == ("sanet50", "seresnet50")
    out = merged(iter(messages))
    layout = next(m for m in messages if c.left in m)
    left, right = layout[c.images["left"]], layout[c.images["right"]]
    assert left["label"] == "Tiny SANet" and left["elem_id"] == "overlay-sanet50"
    assert right["label"] == "Tiny SE" and right["elem_id"] == "overlay-seresnet50"
    assert layout[c.top5["right"]]["elem_id"] == "top5-seresnet50"
    assert layout[c.difference]["label"] == "Tiny SE minus Tiny SANet"
    assert layout[c.difference_box]["label"] == "Difference: Tiny SE minus Tiny SANet"
    assert "Tiny SANet looks more" in layout[c.difference_bar] and "Tiny SE looks more" in layout[c.difference_bar]
    assert layout[p.groups.probe_resnet]["label"] == "Also probe Tiny SANet (takes as long again)"
    assert "Squeeze-and-Excitation (SE)" in layout[p.depth.about] and "one axis of depth" in layout[p.depth.about]
    assert layout[c.right]["value"] == "seresnet50"
    assert ("Tiny SE (untrained)", "seresnet50") in layout[c.right]["choices"]
    assert "Tiny SE" in layout[p.banner] and "untrained" in layout[p.banner]
    # The picture was analysed again with the new pair, without a new upload.
    data = out[p.download.result_json]
    assert list(data["models"]) == ["sanet50", "seresnet50"] and data["models"]["seresnet50"]["gates"]["kind"] == "SE"
    assert data["models"]["seresnet50"]["group_probe"] is not None, "the right model is always probed"
    # SANet50 was probed for this picture as the right model: a probe depends only on the image, so it is kept.
    assert data["models"]["sanet50"]["group_probe"] is not None
    for slot in ("left", "right"):
        assert isinstance(out[c.images[slot]], np.ndarray) and "untrained" in out[c.top5[slot]].lower()
    # SA groups: the right model's chunks, grey and said to have no SA branches; SE's gates of the chunk.
    assert "grey: Tiny SE has no SA branches" in out[p.groups.probe]
    assert "SE gates act per channel" in out[p.groups.detail_text] and "no SA groups" in out[p.groups.detail_text]
    # Across depth: each model in its own unit, stacked; both on one axis of depth.
    assert session.result is not None
    heights = [charts.to_image(charts.model_gates_chart(m)).shape[0] for m in session.result.models.values()]
    assert out[p.depth.heatmap].shape[0] == sum(heights) + 8, "SA's heatmaps above SE's per-channel spreads"
    assert isinstance(out[p.depth.lines], np.ndarray)
    assert "Tiny SANet" in out[p.groups.probe] and "blue: even k" in out[p.groups.probe]
    # The left model's probe waits to be asked.
    other = Session(pair=("resnet50", "seresnet50"))
    analysed(app, other)
    assert other.result is not None and other.result.models["resnet50"].probe is None
    probed = merged(app.add_left_probe(True, 0.5, other))
    assert probed[p.download.result_json]["models"]["resnet50"]["group_probe"] is not None
    assert "grey: Tiny ResNet has no SA branches" in probed[p.groups.probe]
    assert_models_as_found(app.pool)


def test_the_same_model_twice_is_refused_and_the_pickers_go_back(app: Any) -> None:
    c = app.page.compare
    session = Session(page=True, pair=("resnet50", "sanet50"))
    messages = pick(app, "sanet50", "sanet50", session)
    assert len(messages) == 1 and "two different models" in messages[0][c.status]
    assert messages[0][c.left]["value"] == "resnet50" and messages[0][c.right]["value"] == "sanet50"
    assert session.pair == ("resnet50", "sanet50")
    swapped = pick(app, "resnet50", "sanet50", session, path=None)  # unchanged: says nothing
    assert all(v == gr.skip() for m in swapped for v in m.values())
    out = list(app.swap("resnet50", "sanet50", None, "gradcam", "predicted", LAYER, 0.5, False, False, session))
    assert session.pair == ("sanet50", "resnet50") and "Add a picture" in merged(iter(out))[c.status]


def test_a_model_without_gates_says_so_across_depth(app: Any) -> None:
    p = app.page
    session = Session(page=True)
    layout = merged(iter(pick(app, "resnet50", "seresnet50", session)))
    assert "Tiny ResNet has no attention modules" in layout[p.depth.about]
    assert "Tiny SE's SE gates appear here" in app._depth_views(Session(pair=("resnet50", "seresnet50")))[
        p.depth.nearest]
    out = merged(iter(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, session)))
    assert isinstance(out[p.depth.heatmap], np.ndarray) and isinstance(out[p.depth.lines], np.ndarray)
    assert out[p.depth.nearest] == "", "nearest classes compare SA profiles: none in this pair"


def test_the_api_names_its_pair_in_its_last_input_and_defaults_to_the_starting_pair(app: Any) -> None:
    default = merged(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, Session()))
    assert list(default[app.page.download.result_json]["models"]) == ["resnet50", "sanet50"]
    client = Session()  # a gradio_client keeps one session for its calls
    named = merged(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, client,
                               "seresnet50,sanet50"))
    data = named[app.page.download.result_json]
    assert list(data["models"]) == ["seresnet50", "sanet50"] and data["models"]["sanet50"]["group_probe"] is not None
    assert data["models"]["seresnet50"]["group_probe"] is None, "the left model's probe waits to be asked"
    again = merged(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, client))
    assert list(again[app.page.download.result_json]["models"]) == ["resnet50", "sanet50"], \
        "a pair named in one call is for that call only"
    with pytest.raises(gr.Error, match="two different models"):
        list(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, Session(), "sanet50,sanet50"))
    with pytest.raises(gr.Error, match="unknown model"):
        list(app.analyse(CHELSEA, "gradcam", "predicted", LAYER, 0.5, False, False, Session(), "vgg16,sanet50"))
    assert_models_as_found(app.pool)


def test_class_correlation_for_every_gated_model_of_the_pair(app: Any) -> None:
    k = app.page.correlation
    files = [str(EXAMPLES / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    out = app.correlate(files, "cat\ncup\nrocket", Session(pair=("sanet50", "seresnet50")))
    numbers = out[k.numbers]
    assert set(numbers["models"]) == {"sanet50", "seresnet50"}
    assert {key: v for key, v in numbers.items() if key != "models"} == numbers["models"]["sanet50"], \
        "the top level is the first gated model's, as before"
    se = numbers["models"]["seresnet50"]
    assert se["depths"][0] == "SE_2_1" and len(se["mean_between_class_correlation"]) == 8
    assert out[k.table]["headers"] == ["image", "class used", "Tiny SANet prediction", "Tiny SE prediction"]
    assert len(out[k.table]["data"]) == 3 and isinstance(out[k.line], np.ndarray)
    assert "**Tiny SANet is untrained**" in out[k.message] and "**Tiny SE is untrained**" in out[k.message]
    # The default pair: SANet50 alone, as before (no second model in the numbers).
    default = app.correlate(files, "cat\ncup\nrocket", None)
    assert set(default[k.numbers]["models"]) == {"sanet50"}
    assert default[k.table]["headers"] == ["image", "class used", "Tiny SANet prediction"]
    assert_models_as_found(app.pool)


def test_faithfulness_and_downloads_work_for_any_pair(app: Any) -> None:
    f, d = app.page.faithfulness, app.page.download
    session = Session(pair=("sanet50", "seresnet50"))
    analysed(app, session)
    final = list(app.measure(0.5, session))[-1]
    assert "deletion AUC" in final[f.road] and "Tiny SE" in final[f.road]
    for key in ("sanet50", "seresnet50"):
        assert len(final[d.result_json]["models"][key]["faithfulness"]["deletion"]["scores"]) == 33
    files = {Path(x).name for x in app.make_figures("page", True, 0.5, session)[d.figures]}
    assert {"chelsea-overlays.svg", "chelsea-probe.svg", "chelsea-groups.svg", "chelsea-gates.svg",
            "chelsea-gates-seresnet50.svg", "chelsea-gates-across-depth.svg"} <= files
    assert {f"chelsea-figure-page.{fmt}" for fmt in ("pdf", "svg", "png")} <= files  # the pair's comparison figure
    assert_models_as_found(app.pool)


def test_a_pair_with_timms_weights_says_the_recipe_differs() -> None:
    from sanet_viz.ui.pairs import recipe_note

    start = tiny_start()
    se = tiny_se()
    se.weights = start["sanet50"].weights = WeightsInfo("a file", True)
    pool = ModelPool(("sanet50", "seresnet50", "resnet50"), {**start, "seresnet50": se})
    note = recipe_note(pool, ("sanet50", "seresnet50"))
    assert "Tiny SE runs timm's weights: 80.26 % top-1" in note and "its paper's 76.71 %" in note
    assert "Tiny SANet's released weights: 77.88 %" in note and "partly from the training recipe" in note
    assert recipe_note(pool, ("resnet50", "sanet50")) == "", "the papers' own weights: nothing to say"
    se.weights = WeightsInfo("untrained (test)", False)
    assert recipe_note(pool, ("sanet50", "seresnet50")) == "", "untrained: the banner says so instead"


def test_the_pool_keeps_at_most_max_loaded_models_unloading_the_least_recently_used(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    made: list[str] = []

    def load(key: str) -> LoadedModel:
        made.append(key)
        lm = tiny_se()
        lm.key = key
        return lm

    pool = ModelPool(("resnet50", "sanet50", "seresnet50", "ecaresnet50d"), tiny_start(), loader=load,
                     max_loaded=3)
    with pytest.raises(ValueError, match="at least two models must stay loaded"):
        ModelPool(("resnet50", "sanet50"), tiny_start(), max_loaded=1)
    first = pool.lab(("sanet50", "seresnet50"))  # a third model fits
    assert list(pool.models) == ["resnet50", "sanet50", "seresnet50"]
    with caplog.at_level(logging.INFO, logger="sanet-viz"):
        second = pool.lab(("seresnet50", "ecaresnet50d"))  # a fourth: ResNet50, the least recently used, goes
    assert set(pool.models) == {"sanet50", "seresnet50", "ecaresnet50d"} and made == ["seresnet50", "ecaresnet50d"]
    assert "unloaded Tiny ResNet (least recently used; at most 3 models stay loaded" in caplog.text
    assert list(second.models) == ["seresnet50", "ecaresnet50d"]
    assert "sanet50" in first.models and first.models["sanet50"] is pool.models["sanet50"]  # in use: not copied
    assert pool.label("resnet50") == "ResNet50 (untrained)"  # what was known of its weights is kept
    pool.lab(("resnet50", "ecaresnet50d"))  # picked again: loads again, SANet50 (least recent) goes
    assert set(pool.models) == {"resnet50", "seresnet50", "ecaresnet50d"} and made[-1] == "resnet50"
