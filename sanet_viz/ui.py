"""The Gradio app: each view is its own function; all computation lives in the engine.

Models are shared by every visitor (one lock each, in :class:`analysis.LoadedModel`); what
belongs to one visitor (the image, the last result) lives in ``gr.State``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F

from . import charts
from .analysis import AnalysisOptions, AnalysisResult, add_probes, explain
from .cam import CAM_METHODS
from .correlation import class_correlation
from .export import write_result, zip_folder
from .lab import Lab
from .models import module_to_paper_name
from .preprocessing import DecodeLimits, ImageDecodeError, PreparedImage
from .weights import IMAGENET_CATEGORIES

__all__ = ["build_demo", "AppSettings", "THEME", "CSS", "class_choices", "layer_choices", "UploadedImage"]

log = logging.getLogger("sanet-viz")
PREDICTED = "predicted"
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

# System fonts only: the page must load completely with no internet (no Google Fonts).
THEME = gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
CSS = """
.untrained-banner {background:#fdecea; border:1px solid #b00020; border-radius:8px; padding:6px 12px;}
.pretrained-banner {background:#e8f5e9; border:1px solid #2e7d32; border-radius:8px; padding:6px 12px;}
"""


@dataclass
class AppSettings:
    examples_dir: Path = EXAMPLES_DIR
    output_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "sanet-viz-outputs")
    output_ttl_s: float = 3600.0
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    max_correlation_images: int = 48
    cache_ttl_s: int = 3600  # Gradio's copies of uploads and outputs are deleted after this
    concurrency: int = 2  # analyses running at once; more wait in the queue
    profiles: Any = None  # per-class reference profiles from `reproduce` (optional)


@dataclass
class Session:
    """One visitor's state: the prepared image and its latest result."""

    image_key: str = ""
    image: PreparedImage | None = None
    result: AnalysisResult | None = None


# ---------------------------------------------------------------------------------------------
# Uploads

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
            raise gr.Error(f"pasted image: over the upload limit of {self.max_bytes / 2**20:g} MiB",
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


# ---------------------------------------------------------------------------------------------
# Choices

def class_choices() -> list[tuple[str, str]]:
    return [("predicted (each model's top-1)", PREDICTED)] + [
        (f"{i}: {name}", str(i)) for i, name in enumerate(IMAGENET_CATEGORIES)]


def layer_choices(lab: Lab) -> list[tuple[str, str]]:
    """Bottlenecks both models share, named by the paper (SA_5_3 = layer4.2), deepest first."""
    names = [dict(lm.model.named_modules()) for lm in lab.models.values()]
    common = [n for n in names[0] if n.count(".") == 1 and n.startswith("layer") and all(n in m for m in names)]
    return [(f"{module_to_paper_name(n)} ({n})", n) for n in reversed(common)]


def _target(value: str | None) -> int | None:
    if not value or value == PREDICTED:
        return None
    return int(str(value).split(":")[0])


# ---------------------------------------------------------------------------------------------
# Views: each turns a result into what its components show.

def weights_banner(lab: Lab) -> str:
    lines = []
    for lm in lab.models.values():
        if lm.weights.pretrained:
            lines.append(f"**{lm.display_name}**: pretrained weights (`{Path(lm.weights.source).name}`, "
                         f"sha256 `{(lm.weights.sha256 or '')[:12]}…`).")
        else:
            lines.append(f"**Warning: {lm.display_name} is UNTRAINED** (random weights, seed 0): its predictions, "
                         f"heatmaps and probes are not those of the published model. {lm.weights.note}.")
    if any(not lm.weights.pretrained for lm in lab.models.values()):
        lines.append("To add real weights: put `resnet50-0676ba61.pth` (torchvision) and `sa_resnet50.pth.tar` "
                     "(SA-Net release, BaiduDrive code 474p) in `weights/`, or start with `--resnet50 SPEC` / "
                     "`--sanet50 SPEC` (path, URL or `hf://owner/repo/file`). See the README, *Weights*.")
    return "\n\n".join(lines)


def compare_view(result: AnalysisResult, opacity: float) -> list[Any]:
    """Per model: overlay image, top-5 label dict, caption. ResNet50 first, then SANet50."""
    out: list[Any] = []
    for key in ("resnet50", "sanet50"):
        m = result.models.get(key)
        if m is None:
            out += [None, None, ""]
            continue
        out.append(charts.overlay(result.display, m.cam, opacity=opacity))
        out.append({p.label: p.prob for p in m.top5})
        status = "pretrained" if m.weights.pretrained else "**UNTRAINED weights**"
        out.append(f"{CAM_METHODS[m.cam_method][1]} at **{module_to_paper_name(m.cam_layer)}** "
                   f"(`{m.cam_layer}`), explaining class **{m.target_class} {m.target_label}**; {status}; "
                   f"{m.timings_ms.get('cam', 0):.0f} ms")
    return out


def groups_view(result: AnalysisResult) -> list[Any]:
    """The 8x8 grid of SA_5_3 group maps and the probe bars of the probed models."""
    sanet = result.models.get("sanet50") or next(iter(result.models.values()))
    grid = charts.to_image(charts.group_grid(
        sanet.group_maps, title=f"{sanet.display_name}: the 64 group maps of SA_5_3 (layer4.2 output)"))
    return [grid, probe_view(result)]


def probe_view(result: AnalysisResult) -> np.ndarray | None:
    """The probe bars of every model probed so far (None before any)."""
    if not any(m.probe is not None for m in result.models.values()):
        return None
    return charts.to_image(charts.probe_chart(result))


def group_detail_view(result: AnalysisResult, k: int) -> tuple[np.ndarray | None, str]:
    """Chunk k of SA_5_3 large over the image, with the gates of the SA groups it holds."""
    sanet = result.models.get("sanet50")
    if sanet is None:
        return None, ""
    maps = torch.from_numpy(sanet.group_maps)[k][None, None]
    up = F.interpolate(maps, size=result.display.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    span = up.max() - up.min()
    norm = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    picture = charts.overlay(result.display, norm, opacity=0.6)
    groups = sanet.group_maps.shape[0]
    branch = "channel" if k % 2 == 0 else "spatial"
    sa_groups = (k // 2, groups // 2 + k // 2)
    text = [f"**Chunk {k}** of SA_5_3 holds the **{branch}-branch** halves of SA groups "
            f"{sa_groups[0]} and {sa_groups[1]} (the channel shuffle interleaves them); the residual add "
            "then mixes in the identity path."]
    if sanet.sa_gates and "SA_5_3" in sanet.sa_gates:
        gates = sanet.sa_gates["SA_5_3"]
        text += [f"- SA group {g}: mean channel gate {gates['channel'][g]:.3f}, "
                 f"mean spatial gate {gates['spatial'][g]:.3f}" for g in sa_groups]
    if sanet.probe is not None:
        text.append(f"- probe score {float(sanet.probe.scores[k]):.3f} "
                    f"(unmasked {sanet.probe.unmasked_score:.3f})")
    return picture, "\n".join(text)


def depth_view(result: AnalysisResult, profiles: Any = None) -> list[Any]:
    """Gates heatmap, per-stage lines, and the nearest reference classes when profiles are loaded."""
    sanet = result.models.get("sanet50")
    if sanet is None or not sanet.sa_gates:
        return [None, None, ""]
    return [charts.to_image(charts.gates_heatmap(sanet.sa_gates, title="SANet50: SA gates across depth")),
            charts.to_image(charts.gates_lines(sanet.sa_gates)), nearest_view(sanet.sa_gates, profiles)]


def nearest_view(sa_gates: dict[str, dict[str, np.ndarray]], profiles: Any) -> str:
    """Per depth, the reference classes whose mean SA profile correlates best with this image's."""
    if profiles is None:
        return ("*Nearest classes: start the app with `--profiles OUT/profiles.npz` (written by "
                "`python -m sanet_viz reproduce`) to compare this image with per-class SA profiles.*")
    from .profiles import nearest_classes_for

    nearest = nearest_classes_for(sa_gates, profiles, k=3)
    source = "pretrained" if profiles.pretrained else "**UNTRAINED**"
    lines = [f"**Nearest classes by SA profile** (reference: {len(profiles.classes)} classes from "
             f"{profiles.images} images, {source} {profiles.model}):", "",
             "| depth | 1st | 2nd | 3rd |", "|---|---|---|---|"]
    for depth, entries in nearest.items():
        cells = [f"{e.label} ({e.r:.2f})" for e in entries] + [""] * (3 - len(entries))
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def build_demo(lab: Lab, settings: AppSettings | None = None) -> gr.Blocks:
    """The whole app for ``lab``'s models; launch it with :data:`THEME` and :data:`CSS`."""
    settings = settings or AppSettings()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    untrained = any(not lm.weights.pretrained for lm in lab.models.values())
    examples = sorted(str(p) for p in settings.examples_dir.glob("*") if p.suffix.lower() in {".jpg", ".png"})

    def prepare_input(path: str | None, session: Session) -> Session:
        if not path:
            raise gr.Error("Add an image first: upload, drop, paste, use the webcam, or pick an example.",
                           print_exception=False)
        try:
            key = f"{path}:{os.path.getmtime(path)}"
        except OSError:
            raise gr.Error(f"{Path(path).name}: the upload is no longer on the server; add it again.",
                           print_exception=False) from None
        if key != session.image_key or session.image is None:
            try:
                image = lab.prepare(path, limits=settings.limits, name=Path(path).name)
            except ImageDecodeError as exc:  # the visitor's file: a message for them, one log line here
                log.info("refused upload: %s", exc)
                raise gr.Error(str(exc), print_exception=False) from None
            session = Session(key, image, None)
        return session

    def options_from(method: str, target: str | None, layer: str | None) -> AnalysisOptions:
        return AnalysisOptions(method=method, target_class=_target(target), cam_layer=layer or None)

    def save_outputs(result: AnalysisResult) -> tuple[dict[str, Any], str]:
        _prune(settings.output_dir, settings.output_ttl_s)
        folder = Path(tempfile.mkdtemp(prefix="analysis-", dir=settings.output_dir))
        data = write_result(result, folder)
        archive = folder.with_suffix(".zip")
        archive.write_bytes(zip_folder(folder))
        return data, str(archive)

    def run_analysis(path: str | None, method: str, target: str | None, layer: str | None, opacity: float,
                     probe_resnet: bool, session: Session | None,
                     progress: gr.Progress = gr.Progress()) -> Iterator[list[Any]]:
        session = prepare_input(path, session or Session())
        options = options_from(method, target, layer)
        progress(0.05, desc="Grad-CAM: both models")
        previous = session.result
        result = explain(lab, session.image, options, name=Path(path or "image").name)
        if previous is not None:  # probes depend only on the image: keep them across control changes
            for key, mr in result.models.items():
                if key in previous.models:
                    before = previous.models[key]
                    mr.probe, mr.precision, mr.precision_check = before.probe, before.precision, before.precision_check
        session.result = result
        keep = [gr.update()] * 7  # groups, probe, gates heatmap, gates lines, nearest, JSON, zip: not yet
        yield [session, *compare_view(result, opacity), *keep]
        # The group maps and the gates need no probe: show them while SANet50's probe runs (the
        # paper's subject); ResNet50's probe only when asked, as it costs as much again.
        views = [*groups_view(result), *depth_view(result, settings.profiles)]
        yield [session, *[gr.update()] * 6, *views, gr.update(), gr.update()]
        progress(0.4, desc="SANet50 group probes: 64 masked forwards")
        add_probes(lab, session.image, result, model_keys=("sanet50",))
        views[1] = probe_view(result)
        yield [session, *[gr.update()] * 7, views[1], *[gr.update()] * 5]
        if probe_resnet:
            progress(0.7, desc="ResNet50 group probes: 64 masked forwards")
            add_probes(lab, session.image, result, model_keys=("resnet50",))
            views[1] = probe_view(result)  # now with both models
        data, archive = save_outputs(result)
        # The last message is what API clients get: make it complete.
        yield [session, *compare_view(result, opacity), *views, data, archive]

    def add_resnet_probe(probe_resnet: bool, session: Session | None,
                         progress: gr.Progress = gr.Progress()) -> list[Any]:
        """The baseline's probe for the image already analysed, when the box is ticked."""
        if not probe_resnet or session is None or session.result is None or session.image is None:
            return [gr.update()] * 4
        result = session.result
        if "resnet50" in result.models and result.models["resnet50"].probe is None:
            progress(0.1, desc="ResNet50 group probes: 64 masked forwards")
            add_probes(lab, session.image, result, model_keys=("resnet50",))
        data, archive = save_outputs(result)
        return [session, probe_view(result), data, archive]

    def rerender(opacity: float, session: Session | None) -> list[Any]:
        if session is None or session.result is None:
            return [gr.update()] * 6
        return compare_view(session.result, opacity)

    def show_group(k: float, session: Session | None) -> tuple[Any, str]:
        if session is None or session.result is None:
            return None, "Analyse an image first."
        return group_detail_view(session.result, int(k))

    def run_correlation(files: Sequence[str] | None, labels_text: str,
                        progress: gr.Progress = gr.Progress()) -> tuple[Any, Any, list[list[Any]], str]:
        files = list(files or [])
        if len(files) < 2:
            raise gr.Error("Upload at least two images (of at least two classes).")
        if len(files) > settings.max_correlation_images:
            raise gr.Error(f"At most {settings.max_correlation_images} images at once.")
        given = [line.strip() for line in (labels_text or "").splitlines()]
        gates, labels, rows, skipped = [], [], [], []
        for i, path in enumerate(progress.tqdm(files, desc="SA gates per image")):
            name = Path(path).name
            try:
                image = lab.prepare(path, limits=settings.limits, name=name)
            except ImageDecodeError as exc:
                skipped.append(str(exc))
                continue
            res = explain(lab, image, AnalysisOptions(probe=False), model_keys=("sanet50",), name=name)
            sanet = res.models["sanet50"]
            predicted = sanet.top5[0]
            label = given[i] if i < len(given) and given[i] else f"{predicted.index}: {predicted.label}"
            gates.append(sanet.sa_gates)
            labels.append(label)
            rows.append([name, label, f"{predicted.index}: {predicted.label} ({predicted.prob:.1%})"])
        if len(rows) < 2:
            raise gr.Error("Fewer than two of the files are pictures that can be analysed. "
                           + "; ".join(skipped), print_exception=False)
        if len(set(labels)) < 2:
            raise gr.Error("The images fall into fewer than two classes: add images of another class or "
                           "give labels (one per line, in upload order).")
        corr = class_correlation(gates, labels)
        note = [f"{len(rows)} images, {len(corr.classes)} classes."]
        if untrained:
            note.append("**Warning:** SANet50 is UNTRAINED: these gates are not the published model's.")
        if skipped:
            note.append("Skipped: " + "; ".join(skipped))
        return (charts.to_image(charts.correlation_vs_depth(corr)),
                charts.to_image(charts.correlation_matrices(corr, class_names=[str(c) for c in corr.classes])),
                rows, "\n\n".join(note))

    # Gradio deletes its copies of uploads and outputs older than cache_ttl_s, checking every half of it.
    cache_every = max(1, min(1800, settings.cache_ttl_s // 2))
    with gr.Blocks(title="sanet-viz: Shuffle Attention vs ResNet50",
                   delete_cache=(cache_every, settings.cache_ttl_s)) as demo:
        session = gr.State(None)
        gr.Markdown("# sanet-viz: what Shuffle Attention changes inside ResNet50\n"
                    "Grad-CAM of ResNet50 and SANet50 (SA-Net, ICASSP 2021) side by side, the 64 group "
                    "probes at SA_5_3, and the SA gates across depth.")
        gr.Markdown(weights_banner(lab), elem_classes=["untrained-banner" if untrained else "pretrained-banner"],
                    elem_id="weights-banner")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                image_in = UploadedImage(type="filepath", label="Image", height=300, elem_id="image-input",
                                         sources=["upload", "webcam", "clipboard"])
                image_in.max_bytes = settings.limits.max_bytes
                if examples:
                    gr.Examples(examples=examples, inputs=image_in, label="Examples (CC0 / public domain)")
                analyse = gr.Button("Analyse", variant="primary", elem_id="analyse-button")
                with gr.Accordion("Controls", open=True):
                    method = gr.Dropdown([(label, name) for name, (_, label) in CAM_METHODS.items()],
                                         value="gradcam", label="CAM method")
                    target = gr.Dropdown(class_choices(), value=PREDICTED, label="Class to explain",
                                         filterable=True)
                    layers = layer_choices(lab)
                    layer = gr.Dropdown(layers, value=layers[0][1] if layers else None, label="Target layer")
                    opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            with gr.Column(scale=3), gr.Tabs():
                    with gr.Tab("Compare", id="compare"):
                        with gr.Row():
                            with gr.Column():
                                r_img = gr.Image(label="ResNet50", interactive=False, format="png",
                                                 elem_id="overlay-resnet50")
                                r_lab = gr.Label(num_top_classes=5, label="ResNet50 top-5")
                                r_txt = gr.Markdown()
                            with gr.Column():
                                s_img = gr.Image(label="SANet50", interactive=False, format="png",
                                                 elem_id="overlay-sanet50")
                                s_lab = gr.Label(num_top_classes=5, label="SANet50 top-5")
                                s_txt = gr.Markdown()
                        gr.Markdown("Both overlays share one colour scale: 0 (blue) to 1 (red) of each map.")
                    with gr.Tab("SA groups", id="groups"):
                        grid = gr.Image(label="SA_5_3: 64 group maps", interactive=False, height=520, format="png",
                                        elem_id="group-grid")
                        probe = gr.Image(label="Group probes: softmax of the predicted class with the input "
                                         "masked by each group's map", interactive=False, format="png",
                                         elem_id="probe-chart")
                        probe_resnet = gr.Checkbox(False, label="Compare with ResNet50's probe (64 more "
                                                   "forwards: about as long as SANet50's again)",
                                                   elem_id="probe-resnet")
                        group_k = gr.Slider(0, 63, value=0, step=1, label="Group (chunk) k")
                        with gr.Row():
                            group_img = gr.Image(label="Group map", interactive=False, format="png",
                                                 elem_id="group-detail")
                            group_txt = gr.Markdown()
                    with gr.Tab("Across depth", id="depth"):
                        gates_img = gr.Image(label="SA gates: depth x group", interactive=False,
                                             elem_id="gates-heatmap")
                        gates_lines = gr.Image(label="Mean gates per SA module", interactive=False,
                                               elem_id="gates-lines")
                        nearest_md = gr.Markdown(elem_id="nearest-classes")
                    with gr.Tab("Class correlation", id="correlation"):
                        gr.Markdown("Upload images of several classes. Per SA depth, the class x class "
                                    "correlation of mean SA gate profiles: the paper reports group importance "
                                    "shared across classes early and class-specific late.")
                        # No file_types: Gradio would refuse a real picture with an odd or missing
                        # extension; the decoder decides and names each file it skips.
                        corr_files = gr.File(file_count="multiple", label="Images",
                                             elem_id="correlation-files")
                        corr_labels = gr.Textbox(lines=3, label="Labels (optional, one per line in upload "
                                                 "order; blank lines use the predicted class)")
                        corr_button = gr.Button("Correlate", elem_id="correlate-button")
                        corr_msg = gr.Markdown()
                        corr_line = gr.Image(label="Mean between-class correlation vs depth", interactive=False,
                                             elem_id="correlation-depth")
                        corr_mats = gr.Image(label="Class x class correlation", interactive=False,
                                             elem_id="correlation-matrices")
                        corr_table = gr.Dataframe(headers=["image", "class used", "SANet50 prediction"],
                                                  interactive=False)
                    with gr.Tab("Download", id="download"):
                        download = gr.File(label="Everything the CLI writes (zip)", elem_id="download")
                        result_json = gr.JSON(label="result.json")

        outputs = [session, r_img, r_lab, r_txt, s_img, s_lab, s_txt, grid, probe, gates_img, gates_lines,
                   nearest_md, result_json, download]
        inputs = [image_in, method, target, layer, opacity, probe_resnet, session]
        # Progress shows on the probe chart only: heatmaps, group maps and gates stay visible.
        progress_on = [probe]
        analyse.click(run_analysis, inputs, outputs, api_name="analyze", concurrency_id="models",
                      concurrency_limit=settings.concurrency, show_progress_on=progress_on).then(
            show_group, [group_k, session], [group_img, group_txt], api_visibility="private")
        for control in (method, target, layer):
            control.change(run_analysis, inputs, outputs, api_visibility="private", concurrency_id="models",
                           trigger_mode="always_last", show_progress_on=progress_on)
        probe_resnet.input(add_resnet_probe, [probe_resnet, session], [session, probe, result_json, download],
                           api_visibility="private", concurrency_id="models", show_progress_on=[probe])
        opacity.release(rerender, [opacity, session], [r_img, r_lab, r_txt, s_img, s_lab, s_txt],
                        api_visibility="private")
        group_k.release(show_group, [group_k, session], [group_img, group_txt], api_visibility="private")
        corr_button.click(run_correlation, [corr_files, corr_labels], [corr_line, corr_mats, corr_table, corr_msg],
                          api_name="correlate", concurrency_id="models")
    return demo


def _prune(folder: Path, ttl_s: float) -> None:
    """Delete this app's outputs older than ``ttl_s`` (Gradio keeps its own copies for serving)."""
    cutoff = time.time() - ttl_s
    for path in folder.glob("analysis-*"):
        try:
            if path.stat().st_mtime < cutoff:
                if path.is_dir():
                    for child in path.iterdir():
                        child.unlink()
                    path.rmdir()
                else:
                    path.unlink()
        except OSError:
            pass  # another request pruned it first
