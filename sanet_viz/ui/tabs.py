"""One builder per part of the page; each returns its components so handlers can address them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gradio as gr

from ..cam import CAM_METHODS, MULTI_PASS_METHODS
from ..lab import Lab
from ..models import module_to_paper_name
from . import pairs
from .pool import ModelPool
from .session import BY_GROUP, BY_SCORE, CROP, WHOLE
from .style import CLICK_JS
from .texts import GLOSSARY, HOW_TO_READ
from .upload import UploadedImage

__all__ = ["Controls", "CompareTab", "GroupsTab", "DepthTab", "CorrelationTab", "FaithfulnessTab", "DownloadTab",
           "PREDICTED", "build_controls", "build_compare_tab", "build_groups_tab", "build_depth_tab",
           "build_correlation_tab", "build_faithfulness_tab", "build_download_tab", "class_choices",
           "layer_choices", "how_to_read", "SLOTS"]

PREDICTED = "predicted"
SLOTS = ("left", "right")  # the Compare tab's two places; the difference is right minus left


def class_choices(categories: Sequence[str]) -> list[tuple[str, str]]:
    return [("predicted (each model's top-1)", PREDICTED)] + [(f"{i}: {name}", str(i))
                                                               for i, name in enumerate(categories)]


def layer_choices(lab: Lab) -> list[tuple[str, str]]:
    """Bottlenecks every model has, named by the paper (SA_5_3 = layer4.2), deepest first."""
    names = [dict(lm.model.named_modules()) for lm in lab.models.values()]
    common = [n for n in names[0] if n.count(".") == 1 and n.startswith("layer") and all(n in m for m in names)]
    return [(f"{module_to_paper_name(n)} ({n})", n) for n in reversed(common)]


def how_to_read(tab: str, *, glossary: bool = False) -> None:
    with gr.Accordion("How to read this", open=False):
        text = HOW_TO_READ[tab]
        if glossary:
            text += "\n\n**Terms**\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in GLOSSARY.items())
        gr.Markdown(text)


@dataclass
class Controls:
    image: UploadedImage
    analyse: gr.Button
    cancel: gr.Button
    method: gr.Dropdown
    target: gr.Dropdown
    layer: gr.Dropdown
    opacity: gr.Slider
    view: gr.Radio
    models: gr.Textbox  # hidden: /analyze's optional pair "KEY,KEY" (empty: the visitor's pair)


def build_controls(lab: Lab, examples: Sequence[str], max_bytes: int) -> Controls:
    """The picture and the controls; ``lab``: the starting pair (classes, layers)."""
    image = UploadedImage(type="filepath", label="Image", height=260, elem_id="image-input",
                          sources=["upload", "webcam", "clipboard"])
    image.max_bytes = max_bytes
    with gr.Row():
        analyse = gr.Button("Analyse", variant="primary", elem_id="analyse-button", scale=3)
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-button", visible=False, scale=1)
    if examples:
        gr.Examples(examples=list(examples), inputs=image, label="Examples (CC0 / public domain)",
                    examples_per_page=8)
    first = next(iter(lab.models.values()))
    layers = layer_choices(lab)
    with gr.Accordion("Controls", open=True):
        slow = ", ".join(CAM_METHODS[m][1].split(" (")[0] for m in sorted(MULTI_PASS_METHODS))
        method = gr.Dropdown([(label, name) for name, (_, label) in CAM_METHODS.items()], value="gradcam",
                             label="CAM method", info=f"{slow}: minutes here, cancellable", elem_id="method")
        target = gr.Dropdown(class_choices(first.categories or []), value=PREDICTED, label="Class to explain",
                             filterable=True, elem_id="target-class")
        layer = gr.Dropdown(layers, value=layers[0][1] if layers else None, label="Target layer",
                            info="SA_5_3 = the last block; earlier blocks give coarser-grained maps")
        opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
        view = gr.Radio([CROP, WHOLE], value=CROP, label="View", elem_id="view",
                        info="The models see only a 224 x 224 centre crop of the photo")
    models = gr.Textbox("", visible=False, label="models", elem_id="api-models")
    return Controls(image, analyse, cancel, method, target, layer, opacity, view, models)


@dataclass
class CompareTab:
    status: gr.HTML
    images: dict[str, gr.Image]  # by slot (SLOTS); elem_id overlay-<model key>, following the pair
    top5: dict[str, gr.HTML]
    captions: dict[str, gr.HTML]
    difference: gr.Image
    difference_caption: gr.HTML
    left: gr.Dropdown  # the pickers (hidden when the app offers only two models)
    right: gr.Dropdown
    swap: gr.Button
    note: gr.Markdown  # the pair's weights: where recipes differ
    difference_box: gr.Accordion
    difference_bar: gr.HTML


def build_compare_tab(pool: ModelPool, colorbar: str) -> CompareTab:
    pair = pool.start
    words = pairs.pair_texts(pool, pair)
    with gr.Row(elem_id="model-pickers", visible=len(pool.offered) > 2, equal_height=True):
        left = gr.Dropdown(pool.choices(), value=pair[0], label="Left model", elem_id="model-left", scale=4,
                           min_width=130)
        swap = gr.Button("⇄", elem_id="swap-models", scale=0, min_width=44, size="sm")
        right = gr.Dropdown(pool.choices(), value=pair[1], label="Right model", elem_id="model-right", scale=4,
                            min_width=130)
    note = gr.Markdown(words.note, elem_id="pair-note", visible=bool(words.note))
    status = gr.HTML(elem_id="compare-status")
    images, top5, captions = {}, {}, {}
    with gr.Row(elem_id="overlay-row", equal_height=False):
        for slot, key in zip(SLOTS, pair, strict=True):
            with gr.Column(min_width=140):
                images[slot] = gr.Image(label=pool.name(key), interactive=False, format="png",
                                        elem_id=f"overlay-{key}", show_label=True, buttons=["download"])
                top5[slot] = gr.HTML(elem_id=f"top5-{key}")
                captions[slot] = gr.HTML(elem_id=f"caption-{key}")
    gr.HTML(colorbar)
    with gr.Accordion(f"Difference: {words.difference}", open=True, elem_id="difference-box") as difference_box:
        difference = gr.Image(label=words.difference, interactive=False, format="png",
                              elem_id="difference", height=320, buttons=["download"])
        difference_bar = gr.HTML(words.difference_bar)
        difference_caption = gr.HTML(elem_id="difference-caption")
    how_to_read("compare", glossary=True)
    return CompareTab(status, images, top5, captions, difference, difference_caption, left, right, swap, note,
                      difference_box, difference_bar)


@dataclass
class GroupsTab:
    probe: gr.HTML
    sort: gr.Radio
    probe_resnet: gr.Checkbox
    grid: gr.HTML
    group: gr.Slider
    detail_image: gr.Image
    detail_text: gr.Markdown


def build_groups_tab(pool: ModelPool) -> GroupsTab:
    how_to_read("groups", glossary=True)
    probe = gr.HTML(elem_id="probe-chart", js_on_load=CLICK_JS, label="Group probes")
    with gr.Row():
        sort = gr.Radio([BY_GROUP, BY_SCORE], value=BY_GROUP, label="Order the bars", elem_id="probe-sort",
                        scale=1)
        # The left model's probe, on demand (the right one's runs with every analysis).
        probe_resnet = gr.Checkbox(False, label=pairs.pair_texts(pool, pool.start).probe_left,
                                   elem_id="probe-resnet", scale=2)
    with gr.Row():
        with gr.Column(scale=3, min_width=300):
            grid = gr.HTML(elem_id="group-grid", js_on_load=CLICK_JS, label="Group maps")
        with gr.Column(scale=2, min_width=260):
            group = gr.Slider(0, 63, value=0, step=1, label="Group (chunk) k", elem_id="group-k",
                              info="type a number, use the arrow keys, or click a bar or a map")
            detail_image = gr.Image(label="Chunk k over the image", interactive=False, format="png",
                                    elem_id="group-detail", height=300)
            detail_text = gr.Markdown(elem_id="group-text")
    return GroupsTab(probe, sort, probe_resnet, grid, group, detail_image, detail_text)


@dataclass
class DepthTab:
    heatmap: gr.Image  # each gated model's gates in its own unit (SA: depth x group; SE, ECA: per channel)
    lines: gr.Image  # SA's mean gates per module; with two gated models, both on one axis of depth
    nearest: gr.Markdown
    about: gr.Markdown  # what the pair has: which gates, in which unit, or none


def build_depth_tab(pool: ModelPool) -> DepthTab:
    how_to_read("depth")
    about = gr.Markdown(pairs.pair_texts(pool, pool.start).depth, elem_id="gates-about")
    # The charts carry their own titles: no label box over them.
    heatmap = gr.Image(label="Gates of each model across depth", show_label=False, interactive=False,
                       elem_id="gates-heatmap", format="png")
    lines = gr.Image(label="Mean gate per module, on one axis of depth", show_label=False, interactive=False,
                     elem_id="gates-lines", format="png")
    nearest = gr.Markdown(elem_id="nearest-classes")
    return DepthTab(heatmap, lines, nearest, about)


@dataclass
class CorrelationTab:
    files: gr.File
    labels: gr.Textbox
    button: gr.Button
    message: gr.Markdown
    line: gr.Image
    matrices: gr.Image
    table: gr.Dataframe
    numbers: gr.JSON
    intro: gr.Markdown


def build_correlation_tab(pool: ModelPool) -> CorrelationTab:
    intro = gr.Markdown(pairs.pair_texts(pool, pool.start).correlation, elem_id="correlation-intro")
    how_to_read("correlation")
    # No file_types: Gradio would refuse a real picture with an odd or missing extension; the
    # decoder decides and names each file it skips.
    files = gr.File(file_count="multiple", label="Images", elem_id="correlation-files")
    labels = gr.Textbox(lines=3, label="Labels (optional, one per line in upload order; blank lines use the "
                        "predicted class)")
    button = gr.Button("Correlate", elem_id="correlate-button")
    message = gr.Markdown()
    line = gr.Image(label="Mean between-class correlation vs depth", show_label=False, interactive=False,
                    elem_id="correlation-depth")
    matrices = gr.Image(label="Class x class correlation", show_label=False, interactive=False,
                        elem_id="correlation-matrices")
    table = gr.Dataframe(headers=pairs.correlation_headers([pool.name(k) for k in pool.start
                                                            if pool.models[k].has_gates]), interactive=False)
    with gr.Accordion("The numbers (JSON)", open=False):
        numbers = gr.JSON(label="correlation", elem_id="correlation-json")
    return CorrelationTab(files, labels, button, message, line, matrices, table, numbers, intro)


@dataclass
class FaithfulnessTab:
    every: gr.Checkbox
    measure: gr.Button
    verdict: gr.HTML
    curves: gr.Image
    road: gr.Markdown
    randomize: gr.Button
    cascade: gr.Image
    strips: gr.Image


def build_faithfulness_tab() -> FaithfulnessTab:
    how_to_read("faithfulness")
    with gr.Row():
        measure = gr.Button("Measure both maps", variant="primary", elem_id="faithfulness-button", scale=2)
        every = gr.Checkbox(False, label="Measure with every analysis", elem_id="faithfulness-every", scale=1,
                            info="2 x 74 forwards more per image")
    verdict = gr.HTML(elem_id="faithfulness-verdict")
    curves = gr.Image(label="Deletion and insertion curves", show_label=False, interactive=False, format="png",
                      elem_id="faithfulness-curves")
    road = gr.Markdown(elem_id="faithfulness-road")
    randomize = gr.Button("Randomisation check: destroy the models block by block (one CAM per block: about "
                          "18 per model)", elem_id="randomization-button")
    cascade = gr.Image(label="Similarity to the original map as blocks are randomised", show_label=False,
                       interactive=False, format="png", elem_id="randomization-chart")
    strips = gr.Image(label="The maps as blocks are randomised", show_label=False, interactive=False, format="png",
                      elem_id="randomization-strips")
    return FaithfulnessTab(every, measure, verdict, curves, road, randomize, cascade, strips)


@dataclass
class DownloadTab:
    archive: gr.File
    result_json: gr.JSON
    layout: gr.Radio
    difference: gr.Checkbox
    make: gr.Button
    figures: gr.File


def build_download_tab() -> DownloadTab:
    gr.Markdown("Everything `python -m sanet_viz analyze` writes for this image: result.json, the CAM arrays "
                "and the pictures.")
    archive = gr.File(label="Everything the CLI writes (zip)", elem_id="download")
    with gr.Accordion("Figures for slides and handouts", open=True):
        gr.Markdown("The paper-style figure of this image (input, both maps, one colour bar) as PDF, SVG and PNG, "
                    "the same as `python -m sanet_viz figure`, and every chart as SVG; text stays text.")
        with gr.Row():
            layout = gr.Radio(["slide", "page"], value="slide", label="Size", info="16:9 slide or A4 page",
                              elem_id="figure-layout")
            difference = gr.Checkbox(True, label="With the difference map", elem_id="figure-difference")
        make = gr.Button("Make figures", elem_id="figure-button")
        figures = gr.File(label="Figures", file_count="multiple", elem_id="figure-files")
    result_json = gr.JSON(label="result.json", elem_id="result-json")
    return DownloadTab(archive, result_json, layout, difference, make, figures)
