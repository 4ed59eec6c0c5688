"""Pure view functions: an analysis result (and a few choices) in, what a component shows out.

Nothing here touches a model, a session or Gradio: images are uint8 arrays, the rest HTML or
Markdown strings. The interactive charts are an SVG (as an ``<img>``) under transparent hit areas
that carry a tooltip and the group number a click selects (see ``tabs.CLICK_JS``).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .. import charts
from ..cam import CAM_METHODS
from ..correlation import ClassCorrelation
from ..results import AnalysisResult, ModelResult
from .session import BY_SCORE, WHOLE
from .texts import term

__all__ = ["cam_image", "difference_image", "top5_html", "caption_html", "colorbar_html", "probe_chart_html",
           "group_grid_html", "group_detail", "nearest_view", "status_html", "faithfulness_table", "stacked",
           "titled", "correlation_depth_image", "DIFF_CMAP", "GRID_CELL"]

DIFF_CMAP = "RdBu_r"
GRID_CELL, GRID_GAP, GRID_COLS = 72, 2, 8
UNTRAINED_BADGE = '<span class="badge-untrained" title="random weights: not the published model">untrained</span>'


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    """(256, 3) float colours of a matplotlib colour map."""
    return charts.plt.get_cmap(name)(np.linspace(0, 1, 256))[:, :3]


def _colour(values: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) floats through a colour map."""
    return _lut(name)[np.clip(np.rint(np.clip(values, 0, 1) * 255), 0, 255).astype(np.int64)]


def _gradient_css(name: str, stops: int = 11) -> str:
    colours = [_lut(name)[round(i * 255 / (stops - 1))] for i in range(stops)]
    return ", ".join(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})" for r, g, b in colours)


def colorbar_html(name: str, low: str, high: str, caption: str = "") -> str:
    """A horizontal colour bar with its two ends named, as HTML (scales with the page)."""
    return (f'<div class="colorbar"><div class="colorbar-strip" style="background:linear-gradient(to right, '
            f'{_gradient_css(name)})"></div><div class="colorbar-ends"><span>{html.escape(low)}</span>'
            f'<span>{html.escape(caption)}</span><span>{html.escape(high)}</span></div></div>')


def status_html(text: str, *, kind: str = "info") -> str:
    """A one-line status (``info``, ``busy``, ``stale``, ``error``) above the heatmaps."""
    return f'<div class="status status-{kind}">{text}</div>' if text else ""


# ---------------------------------------------------------------------------------------------
# Heatmaps

def _blend(base: np.ndarray, heat: np.ndarray, opacity: float) -> np.ndarray:
    return (np.clip((1.0 - opacity) * base.astype(np.float64) / 255.0 + opacity * heat, 0, 1) * 255).round() \
        .astype(np.uint8)


def _in_place(result: AnalysisResult, crop_picture: np.ndarray) -> np.ndarray:
    """The crop picture pasted where the crop lies in the whole photo, the rest dimmed and outlined."""
    preview, box = result.preview, result.crop_box
    if preview is None or box is None:
        return crop_picture
    x0, y0, x1, y1 = (round(v) for v in box)
    canvas = Image.fromarray((preview.astype(np.float64) * 0.45).astype(np.uint8))
    canvas.paste(Image.fromarray(crop_picture).resize((max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.BILINEAR),
                 (x0, y0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=max(2, canvas.width // 200))
    return np.asarray(canvas)


def cam_image(result: AnalysisResult, key: str, *, opacity: float, view: str) -> np.ndarray | None:
    """Model ``key``'s CAM over the crop (or in place on the whole photo); None while it is pending."""
    m = result.models.get(key)
    if m is None or m.cam is None:
        return None
    picture = charts.overlay(result.display, m.cam, opacity=opacity)
    return _in_place(result, picture) if view == WHOLE else picture


def difference_image(result: AnalysisResult, *, view: str) -> np.ndarray | None:
    """The right (second) model's map minus the left one's over a grey copy of the crop: red where
    the right one looks more (SANet50 minus ResNet50 for the default pair)."""
    maps = [m.cam for m in result.models.values()]
    if len(maps) != 2 or any(c is None for c in maps):
        return None
    first, second = maps
    diff = (second - first + 1.0) / 2.0  # type: ignore[operator]
    grey = np.repeat(result.display.mean(-1, keepdims=True), 3, axis=-1)
    picture = _blend(grey, _colour(diff, DIFF_CMAP), 0.6)
    return _in_place(result, picture) if view == WHOLE else picture


def top5_html(m: ModelResult) -> str:
    """The prediction as a headline (marked when the weights are untrained) and the top-5 as bars."""
    top = m.top5[0]
    badge = "" if m.weights.pretrained else UNTRAINED_BADGE
    rows = "".join(f'<li><span class="bar" style="width:{max(p.prob, 0.002) * 100:.1f}%"></span>'
                   f'<span class="name">{html.escape(p.label)}</span><span class="prob">{p.prob:.1%}</span></li>'
                   for p in m.top5)
    return (f'<div class="top5"><div class="headline">{badge}<b>{html.escape(top.label)}</b> {top.prob:.1%}</div>'
            f'<ol>{rows}</ol></div>')


def caption_html(m: ModelResult) -> str:
    """What this map explains: method, layer, class (or that the method ignores the class)."""
    method = CAM_METHODS[m.cam_method][1].split(" (")[0]
    where = f"{method} at {m.cam_layer}"
    paper = m.to_dict()["cam"]["paper_name"]
    if paper:
        where = f"{method} at {paper} ({m.cam_layer})"
    if m.class_agnostic:
        what = f"{html.escape(method)} ignores the class: the same map for every class (choosing one has no effect)"
    else:
        what = f"explains class {m.target_class} <b>{html.escape(m.target_label)}</b>"
    return f'<div class="caption">{html.escape(where)}; {what}</div>'


# ---------------------------------------------------------------------------------------------
# Probe chart: SVG bars, one panel per probed model, under clickable hit areas

def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = np.floor(np.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * 10 ** exponent >= value:
            return float(step * 10 ** exponent)
    return float(10 ** (exponent + 1))


def _label_at(x: float, y: float, text: str, *, total_w: float, total_h: float, cls: str = "tick",
              anchor: str = "start") -> str:
    """Text over the chart as HTML, positioned in percent: it keeps its size on any screen."""
    shift = {"start": "0", "middle": "-50%", "end": "-100%"}[anchor]
    return (f'<span class="{cls}" style="left:{100 * x / total_w:.3f}%;top:{100 * y / total_h:.3f}%;'
            f'transform:translate({shift},-50%)">{text}</span>')


PROBE_W, PROBE_PANEL_H = 560, 270
_L, _R, _T, _B = 44, 8, 60, 40


def _probe_panel(m: ModelResult, top: float, sort: str, selected: int | None,
                 total_h: float) -> tuple[list[str], list[str]]:
    """SVG shapes and HTML text/hit areas of one model's panel, ``top`` SVG units down."""
    probe = m.probe
    assert probe is not None
    scores = probe.scores.numpy().astype(np.float64)
    order = np.argsort(-scores, kind="stable") if sort == BY_SCORE else np.arange(len(scores))
    ymax = _nice_ceiling(max(float(scores.max()), probe.unmasked_score) * 1.12)
    plot_w, plot_h = PROBE_W - _L - _R, PROBE_PANEL_H - _T - _B
    base, bw = top + _T + plot_h, plot_w / len(scores)
    sa = m.sa_gates is not None

    def at(x: float, y: float, text: str, cls: str = "tick", anchor: str = "start") -> str:
        return _label_at(x, y, text, total_w=PROBE_W, total_h=total_h, cls=cls, anchor=anchor)

    untrained = "" if m.weights.pretrained else UNTRAINED_BADGE
    html_parts = [at(2, top + 13, f"{untrained}<b>{html.escape(m.display_name)}</b>: class {probe.target_class} "
                                  f"{html.escape(probe_label(m))}", cls="title"),
                  at(2, top + 36, "blue: even k (channel-branch halves) · orange: odd k (spatial)"
                     if sa else f"grey: {html.escape(m.display_name)} has no SA branches", cls="legend")]
    svg = []
    for i in range(5):
        y = base - plot_h * i / 4
        svg.append(f'<line x1="{_L}" y1="{y:.1f}" x2="{PROBE_W - _R}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        html_parts.append(at(_L - 3, y, f"{ymax * i / 4:.3g}", anchor="end"))
    for pos, k in enumerate(order):
        k = int(k)
        h = plot_h * scores[k] / ymax
        x = _L + pos * bw
        colour = (charts.BRANCH_COLOURS["channel" if k % 2 == 0 else "spatial"] if sa else charts.RESNET_COLOUR)
        stroke = ' stroke="#000" stroke-width="1.5"' if k == selected else ""
        svg.append(f'<rect x="{x + 0.12 * bw:.2f}" y="{base - h:.2f}" width="{0.76 * bw:.2f}" height="{h:.2f}" '
                   f'fill="{colour}"{stroke}/>')
        tip = (f"{m.display_name}, group k={k} ({'channel' if k % 2 == 0 else 'spatial'}-branch halves)\n"
               if sa else f"{m.display_name}, group k={k}\n") + \
            f"score {scores[k]:.4f} (unmasked {probe.unmasked_score:.4f})"
        html_parts.append(_hit(k, x, top + _T, bw, plot_h, PROBE_W, tip, k == selected, total_h=total_h))
    y_ref = base - plot_h * probe.unmasked_score / ymax
    svg.append(f'<line x1="{_L}" y1="{y_ref:.1f}" x2="{PROBE_W - _R}" y2="{y_ref:.1f}" stroke="#000" '
               'stroke-dasharray="5,3" stroke-width="1.2"/>')
    html_parts.append(at(PROBE_W - _R, y_ref - 8, f"unmasked {probe.unmasked_score:.3f}", cls="ref", anchor="end"))
    svg.append(f'<line x1="{_L}" y1="{base:.1f}" x2="{PROBE_W - _R}" y2="{base:.1f}" stroke="#555"/>')
    html_parts += [at(_L + (pos + 0.5) * bw, base + 10, str(int(order[pos])), anchor="middle")
                   for pos in range(0, len(scores), 8)]
    axis = "groups sorted by score (labels: group k)" if sort == BY_SCORE else "group k (chunk of 32 channels)"
    html_parts.append(at(_L + plot_w / 2, base + 28, axis, cls="axis", anchor="middle"))
    return svg, html_parts


def probe_label(m: ModelResult) -> str:
    assert m.probe is not None
    c = m.probe.target_class
    return m.target_label if c == m.target_class else next((p.label for p in m.top5 if p.index == c), str(c))


def _hit(k: int, x: float, y: float, w: float, h: float, total_w: float, tip: str, selected: bool, *,
         total_h: float, label: str = "") -> str:
    """A transparent, clickable area over part of the picture (percentages: it scales with it)."""
    style = (f"left:{100 * x / total_w:.3f}%;top:{100 * y / total_h:.3f}%;width:{100 * w / total_w:.3f}%;"
             f"height:{100 * h / total_h:.3f}%")
    return (f'<div class="hit{" sel" if selected else ""}" data-group="{k}" title="{html.escape(tip)}" '
            f'style="{style}">{label}</div>')


def probe_chart_html(result: AnalysisResult, *, sort: str = "", selected: int | None = None) -> str:
    """Every probed model's bars: hover for values, click to open a group."""
    probed = [m for m in result.models.values() if m.probe is not None]
    if not probed:
        return '<div class="placeholder">The probe runs right after the heatmaps (64 masked forwards).</div>'
    svg: list[str] = []
    hits: list[str] = []
    height = PROBE_PANEL_H * len(probed)
    for i, m in enumerate(probed):
        parts, panel_hits = _probe_panel(m, i * PROBE_PANEL_H, sort, selected, height)
        svg += parts
        hits += panel_hits
    # preserveAspectRatio none: on a phone the CSS makes the chart taller than its aspect (the bars
    # stretch, the HTML text does not); lines keep their width.
    document = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PROBE_W} {height}" width="{PROBE_W}" '
                f'height="{height}" preserveAspectRatio="none"><style>line, rect {{vector-effect: '
                f'non-scaling-stroke}}</style><rect width="100%" height="100%" fill="#fff"/>{"".join(svg)}</svg>')
    src = "data:image/svg+xml;base64," + base64.b64encode(document.encode()).decode()
    order = "sorted by score" if sort == BY_SCORE else "in group order"
    return (f'<div class="chart probe-chart" style="--panels:{len(probed)}"><img src="{src}" '
            f'alt="Probe scores per group for '
            f'{", ".join(m.display_name for m in probed)}, bars {order}">{"".join(hits)}</div>')


# ---------------------------------------------------------------------------------------------
# Group maps: one picture of 64 small overlays, clickable

def _chunk_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(G, h, w) group maps -> (G, size, size) in [0, 1], upsampled and scaled as the probe's masks."""
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None], size=(size, size),
                       mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(-2, -1), keepdim=True)
    span = up.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up)).numpy()


def _jpeg_data_url(picture: np.ndarray, quality: int = 88) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _grid_model(result: AnalysisResult, key: str | None) -> ModelResult:
    return result.models[key] if key else result.models.get("sanet50") or next(iter(result.models.values()))


def group_grid_html(result: AnalysisResult, *, selected: int | None = None, key: str | None = None) -> str:
    """Model ``key``'s (default: SANet50's, else the first model's) 64 group maps over the crop,
    numbered; click one to open it."""
    m = _grid_model(result, key)
    g = m.group_maps.shape[0]
    rows = int(np.ceil(g / GRID_COLS))
    cell, gap = GRID_CELL, GRID_GAP
    width, height = GRID_COLS * cell + (GRID_COLS - 1) * gap, rows * cell + (rows - 1) * gap
    small = np.asarray(Image.fromarray(result.display).resize((cell, cell), Image.Resampling.BILINEAR))
    heats = _colour(_chunk_maps(m.group_maps, cell), charts.CAM_CMAP)
    mosaic = np.full((height, width, 3), 255, np.uint8)
    hits = []
    scores = m.probe.scores.numpy() if m.probe is not None else None
    for k in range(g):
        r, c = divmod(k, GRID_COLS)
        y, x = r * (cell + gap), c * (cell + gap)
        mosaic[y:y + cell, x:x + cell] = _blend(small, heats[k], 0.55)
        tip = f"group k={k}" + (f": probe score {scores[k]:.4f}" if scores is not None else "")
        hits.append(_hit(k, x, y, cell, cell, width, tip, k == selected, total_h=height,
                         label=f'<span class="k">{k}</span>'))
    return (f'<div class="chart group-grid"><img src="{_jpeg_data_url(mosaic)}" alt="{g} group maps of '
            f'{html.escape(m.display_name)}">{"".join(hits)}</div>'
            + colorbar_html(charts.CAM_CMAP, "low", "high", "each map scaled to its own range, as the probe's mask"))


def group_detail(result: AnalysisResult, k: int, *, key: str | None = None) -> tuple[np.ndarray | None, str]:
    """Chunk ``k`` of model ``key``'s probe layer (SA_5_3) large over the image, with what it holds,
    its gates and probe score."""
    m = _grid_model(result, key)
    g = m.group_maps.shape[0]
    k = int(np.clip(k, 0, g - 1))
    mask = _chunk_maps(m.group_maps[k:k + 1], result.display.shape[0])[0]
    picture = _blend(result.display, _colour(mask, charts.CAM_CMAP), 0.6)
    if m.sa_gates is None:
        return picture, "\n".join(_plain_chunk(m, k) + _probe_line(m, k))
    lines = [f"**Chunk {k}** = channels {32 * k}-{32 * k + 31} of {term('SA_5_3')}'s output."]
    if m.sa_gates:
        branch = "channel" if k % 2 == 0 else "spatial"
        groups = (k // 2, g // 2 + k // 2)
        lines.append(f"It holds the **{branch}-branch** halves of SA groups {groups[0]} and {groups[1]} (the "
                     "channel shuffle interleaves them; the residual add then mixes in the block's input).")
        gates = m.sa_gates.get("SA_5_3")
        if gates is not None:
            lines += [f"- SA group {s}: mean channel gate {gates['channel'][s]:.3f}, mean spatial gate "
                      f"{gates['spatial'][s]:.3f}" for s in groups]
    return picture, "\n".join(lines + _probe_line(m, k))


def _probe_line(m: ModelResult, k: int) -> list[str]:
    if m.probe is None:
        return []
    return [f"- Probe: {m.probe.scores[k]:.4f} with the input masked by this map "
            f"(unmasked {m.probe.unmasked_score:.4f})."]


def _plain_chunk(m: ModelResult, k: int) -> list[str]:
    """What chunk ``k`` is in a model without SA: consecutive channels, no branches; for SE and ECA,
    the channel gates those channels got in the same block."""
    name, g = html.escape(m.display_name), m.group_maps.shape[0]
    profile = m.gates
    if profile is None or profile.layout.unit != "channel":
        return [f"**Chunk {k}** = channels {32 * k}-{32 * k + 31} of the last block's output (layer4.2, where "
                f"SANet50 has {term('SA_5_3')}).",
                f"{name} has no attention modules: no SA groups or branches (its bars are grey), no gates."]
    depth = profile.layout.depth_name(m.probe.layer) if m.probe is not None else profile.depths[-1]
    gates = np.asarray(profile.values.get(depth, profile.values[profile.depths[-1]])["channel"], np.float64)
    per = max(1, len(gates) // g)
    mine = gates[per * k:per * (k + 1)]
    layer = m.probe.layer if m.probe is not None else "the last block"
    return [f"**Chunk {k}** = channels {per * k}-{per * (k + 1) - 1} of {layer}'s output (the block of {depth}).",
            f"{name} has no SA groups or branches (its bars are grey): a chunk is just {per} consecutive channels. "
            f"Its {profile.layout.kind} gates act per channel: at {depth} these {per} channels' gates have mean "
            f"{mine.mean():.3f} (from {mine.min():.3f} to {mine.max():.3f})."]


# ---------------------------------------------------------------------------------------------
# Depth

def nearest_view(sa_gates: dict[str, dict[str, np.ndarray]], profiles: Any) -> str:
    """Per depth, the reference classes whose mean SA profile correlates best with this image's."""
    if profiles is None:
        return ("*Nearest classes: start the app with `--profiles OUT/profiles.npz` (written by "
                "`python -m sanet_viz reproduce`) to compare this image with per-class SA profiles.*")
    from ..profiles import nearest_classes_for

    nearest = nearest_classes_for(sa_gates, profiles, k=3)
    source = "pretrained" if profiles.pretrained else "**UNTRAINED**"
    lines = [f"**Nearest classes by SA profile** (reference: {len(profiles.classes)} classes from "
             f"{profiles.images} images, {source} {profiles.model}):", "",
             "| depth | 1st | 2nd | 3rd |", "|---|---|---|---|"]
    for depth, entries in nearest.items():
        cells = [f"{e.label} ({e.r:.2f})" for e in entries] + [""] * (3 - len(entries))
        if not entries:
            cells[0] = "undefined (constant profile)"
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_rows(rows: Sequence[Sequence[object]]) -> list[list[object]]:
    return [list(r) for r in rows]


def faithfulness_table(measured: dict[str, ModelResult]) -> str:
    """AUCs and ROAD per model as a Markdown table, with which way is better."""
    rows = ["| model | deletion AUC (lower better) | insertion AUC (higher better) | ROAD (higher better) |",
            "|---|---|---|---|"]
    for name, m in measured.items():
        f = m.faithfulness
        assert f is not None
        tag = " (untrained)" if not m.weights.pretrained else ""
        rows.append(f"| {name}{tag} | {f.deletion.auc:.3f} | {f.insertion.auc:.3f} | {f.road.combined:.3f} |")
    return "\n".join(rows)


def stacked(pictures: Sequence[np.ndarray], *, centre: bool = False) -> np.ndarray | None:
    """Pictures one above the other (white padding to the widest, on the right or both sides)."""
    if not pictures:
        return None
    width = max(p.shape[1] for p in pictures)

    def sides(p: np.ndarray) -> tuple[int, int]:
        spare = width - p.shape[1]
        return (spare // 2, spare - spare // 2) if centre else (0, spare)

    padded = [np.pad(p, ((0, 8), sides(p), (0, 0)), constant_values=255) for p in pictures]
    return np.concatenate(padded)[:-8]


def titled(fig: Figure, title: str) -> np.ndarray:
    """``fig`` as a picture with ``title`` above it (the name of the model a chart belongs to)."""
    fig.suptitle(title, fontsize=11, fontweight="bold", y=1.0, va="bottom")
    return charts.to_image(fig)


def _depth_key(depth: str) -> str:
    """``"SE_5_3"`` -> ``"5_3"``: the place on the common axis of depth (stage_block)."""
    return depth.split("_", 1)[1]


def correlation_depth_image(corrs: Mapping[str, ClassCorrelation], *, kinds: Mapping[str, str],
                            untrained: Collection[str] = ()) -> np.ndarray:
    """Mean between-class correlation against depth for every gated model (by display name), on
    one axis of stage_block (2_1 ... 5_3): the paper's claim (shared early, class-specific late)
    read for SA beside SE or ECA on the same images. An undefined depth is no point on its line,
    but a grey cross on the axis, with the reasons below."""
    positions = sorted({_depth_key(d) for c in corrs.values() for d in c.depths},
                       key=lambda p: tuple(int(v) for v in p.split("_")))
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.subplots()
    reasons: set[str] = set()
    lows = [-0.05]
    for i, (name, corr) in enumerate(corrs.items()):
        colour = charts.GATE_MODEL_COLOURS[i % len(charts.GATE_MODEL_COLOURS)]
        x = np.array([positions.index(_depth_key(d)) for d in corr.depths])
        r = np.array([corr.mean_between[d] for d in corr.depths], np.float64)
        defined = ~np.isnan(r)
        tag = " (UNTRAINED)" if name in untrained else ""
        what = "64 channel + 64 spatial group gates" if kinds.get(name) == "SA" else "one gate per channel"
        if defined.any():
            ax.plot(x[defined], r[defined], marker="o", color=colour,
                    label=f"{name}{tag}: {kinds.get(name, '')} profile ({what})")
            lows.append(float(r[defined].min()) - 0.05)
        if (~defined).any():
            ax.plot(x[~defined], np.full((~defined).sum(), -1.0 + 0.04 * i), "x", color=colour, ms=7,
                    label=f"{name}{tag}: undefined at {int((~defined).sum())} of {len(r)} depths (x)")
            reasons |= {corr.notes[d] for d in corr.depths if d in corr.notes and not corr.defined(d)}
    for i in range(1, len(positions)):  # grey lines between stages
        if positions[i].split("_")[0] != positions[i - 1].split("_")[0]:
            ax.axvline(i - 0.5, color="#cccccc", lw=1)
    ax.set_xticks(range(len(positions)), positions, fontsize=8)
    ax.set_xlabel("depth: stage_block (stage 2-5 = layer1-layer4)", fontsize=8)
    ax.set_ylim(-1.05 if reasons else min(lows), 1.05)
    ax.set_ylabel("mean between-class r", fontsize=9)
    first = next(iter(corrs.values()))
    heading = (f"Between-class correlation of mean gate profiles, {len(first.classes)} classes "
               "(paper: high early, falling with depth)")
    ax.set_title(heading + (f"\n{charts.UNTRAINED_NOTE}" if untrained else ""), fontsize=9,
                 color="#b00020" if untrained else "black")
    # Legend and reasons under the axes: they never cover a line or a cross.
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    if reasons:
        fig.text(0.99, 0.01, textwrap.fill("x: undefined - " + "; ".join(sorted(reasons)), 60), ha="right",
                 va="bottom", fontsize=7, color="#555555")
    fig.subplots_adjust(left=0.09, right=0.98, top=0.88, bottom=0.36)
    return charts.to_image(fig)
