"""The Gradio app: :func:`build_demo` lays out the page (one builder per tab, in :mod:`tabs`) and
wires each event to a :class:`handlers.Handlers` method. Computation lives in the engine, views in
:mod:`views` (pure functions), per-visitor state in :class:`session.Session`. Models are shared
by every visitor (one lock each, in :class:`lab.LoadedModel`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..lab import Lab
from . import views
from .handlers import AppSettings, Handlers, Page
from .pairs import weights_banner as _weights_banner
from .pool import ModelPool
from .session import Session
from .style import CSS, SCROLL_JS, THEME
from .tabs import (
    build_compare_tab,
    build_controls,
    build_correlation_tab,
    build_depth_tab,
    build_download_tab,
    build_faithfulness_tab,
    build_groups_tab,
    class_choices,
    layer_choices,
)
from .texts import INTRO, intro
from .upload import UploadedImage
from .views import nearest_view

__all__ = ["build_demo", "AppSettings", "Handlers", "ModelPool", "Session", "THEME", "CSS", "UploadedImage",
           "nearest_view", "class_choices", "layer_choices", "weights_banner", "INTRO"]


def weights_banner(models: Lab | ModelPool) -> tuple[str, str]:
    """(one sentence for visitors, detail for the operator) about every offered model's weights
    (:func:`pairs.weights_banner`)."""
    return _weights_banner(models if isinstance(models, ModelPool) else ModelPool.of(models))


def build_demo(models: Lab | ModelPool, settings: AppSettings | None = None) -> gr.Blocks:
    """The whole app for the offered models (a :class:`ModelPool`, or a lab's models, all loaded:
    its first two are the pair a visitor starts with); launch it with :data:`THEME` and :data:`CSS`.

    The handlers are on ``demo.handlers`` (tests call them without a server).
    """
    pool = models if isinstance(models, ModelPool) else ModelPool.of(models)
    start = pool.lab(pool.start)
    settings = settings or AppSettings()
    examples = sorted(str(p) for p in settings.examples_dir.glob("*") if p.suffix.lower() in {".jpg", ".png"})
    colorbar = views.colorbar_html("jet", "0: weakest", "1: strongest", "each map scaled to its own maximum")
    cache_every = max(1, min(1800, settings.cache_ttl_s // 2))
    with gr.Blocks(title="sanet-viz: Shuffle Attention vs ResNet50",
                   delete_cache=(cache_every, settings.cache_ttl_s)) as demo:
        session = gr.State(lambda: Session())  # a fresh one per visitor (a class would be read as a value)
        gr.Markdown("## sanet-viz: what Shuffle Attention changes inside ResNet50\n" + intro(len(pool.offered)),
                    elem_id="page-title")
        visitor, operator = weights_banner(pool)
        banner = gr.HTML(visitor, elem_id="weights-banner")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                controls = build_controls(start, examples, settings.limits.max_bytes)
            with gr.Column(scale=3, elem_id="results"), gr.Tabs(overflow_behavior="wrap"):
                with gr.Tab("Compare", id="compare"):
                    compare = build_compare_tab(pool, colorbar)
                with gr.Tab("SA groups", id="groups"):
                    groups = build_groups_tab(pool)
                with gr.Tab("Across depth", id="depth"):
                    depth = build_depth_tab(pool)
                with gr.Tab("Class correlation", id="correlation"):
                    correlation = build_correlation_tab(pool)
                with gr.Tab("Faithfulness", id="faithfulness"):
                    faithfulness = build_faithfulness_tab()
                with gr.Tab("Download", id="download"):
                    download = build_download_tab()
        if operator:  # at the bottom: visitors need the banner's one sentence, operators this
            with gr.Accordion("For the server's operator: why untrained, and how to add the real weights",
                              open=False, elem_id="operator-notes"):
                gr.Markdown(operator)
        page = Page(session, controls, compare, groups, depth, correlation, faithfulness, download, banner)
        handlers = Handlers(pool, settings, page)
        _wire(demo, handlers, page, settings)
    demo.handlers = handlers  # type: ignore[attr-defined]
    return demo


def _wire(demo: gr.Blocks, h: Handlers, page: Page, settings: AppSettings) -> None:
    c, g, s = page.controls, page.groups, page.session
    outputs = page.analysis_outputs()
    quiet: dict[str, Any] = {"show_progress": "hidden"}
    fast: dict[str, Any] = {"concurrency_id": "fast", "concurrency_limit": settings.concurrency, **quiet}
    slow: dict[str, Any] = {"concurrency_id": "slow", "concurrency_limit": 1, "api_visibility": "private", **quiet}
    f = page.faithfulness
    # The last input, hidden on the page, is the API's optional pair ("sanet50,seresnet50"); the
    # page's pickers set the visitor's pair instead (Session.pair).
    inputs = [c.image, c.method, c.target, c.layer, c.opacity, g.probe_resnet, f.every, s, c.models]
    p = page.compare

    demo.load(h.new_session, None, [s, p.left, p.right, *([page.banner] if page.banner else [])],
              api_visibility="private", queue=False)
    # The API's /analyze: one event, every output, its last message complete. The page's Analyse
    # (and a changed method, class or layer) updates the Compare tab from an event of its own and
    # the other tabs from one chained after it: the browser's work per message grows with the
    # event's outputs, and on a small machine it competes with the models (docs/performance.md).
    gr.on([], h.analyse, inputs, outputs, api_name="analyze", **fast)
    private: dict[str, Any] = {"api_visibility": "private", **fast}
    first = [c.analyse.click(h.analyse_page, inputs, page.compare_outputs(), js=SCROLL_JS, **private)]
    first += [control.change(h.reanalyse, inputs, page.compare_outputs(), trigger_mode="always_last", **private)
              for control in (c.method, c.target, c.layer)]
    runs = [run.then(h.continue_analysis, [s], page.rest_outputs(), **private) for run in first]
    picked = [p.left, p.right, *inputs[:-1]]
    pair_outputs = [*outputs, *h.layout_outputs()]
    runs += [picker.input(h.pick, picked, pair_outputs, trigger_mode="always_last", api_visibility="private", **fast)
             for picker in (p.left, p.right)]
    runs.append(p.swap.click(h.swap, picked, pair_outputs, api_visibility="private", **fast))
    finishing = [run.then(h.complete_slow, [c.opacity, s], outputs, **slow) for run in runs]
    c.cancel.click(h.cancel, [s], [page.compare.status, c.cancel], cancels=finishing, api_visibility="private",
                   queue=False)
    c.image.change(h.new_image, [c.image, s], [*outputs, c.image], cancels=finishing, api_visibility="private",
                   **quiet)
    compare_outputs = [*page.compare.images.values(), *page.compare.captions.values(), page.compare.difference,
                       page.compare.difference_caption, *page.compare.top5.values()]
    for control in (c.opacity, c.view):
        control.change(h.rerender, [c.opacity, c.view, s], compare_outputs, api_visibility="private",
                       trigger_mode="always_last", **quiet)
    group_outputs = [g.probe, g.grid, g.group, g.detail_image, g.detail_text]
    # .input: typed, keyed or dragged by the visitor (a .change would also fire when a tab mounts).
    g.group.input(h.select_group, [g.group, s], group_outputs, api_visibility="private",
                  trigger_mode="always_last", **quiet)
    for chart in (g.probe, g.grid):
        chart.click(h.group_clicked, [s], group_outputs, api_visibility="private", **quiet)
    g.sort.change(h.resort, [g.sort, s], [g.probe], api_visibility="private", **quiet)
    g.probe_resnet.input(h.add_resnet_probe, [g.probe_resnet, c.opacity, s], outputs, api_visibility="private",
                         **fast)
    f.measure.click(h.measure, [c.opacity, s], outputs, api_visibility="private", **fast)
    f.randomize.click(h.randomize, [c.opacity, s], outputs, api_visibility="private", **fast)
    d = page.download
    d.make.click(h.make_figures, [d.layout, d.difference, c.opacity, s], [d.figures], api_visibility="private",
                 **fast)
    r = page.correlation
    # The session's pair (an API call: the starting pair); its outputs and inputs as before pairs.
    r.button.click(h.correlate, [r.files, r.labels, s], [r.line, r.matrices, r.table, r.message, r.numbers],
                   api_name="correlate", **fast)
