"""Pictures of analysis results (matplotlib, no display needed)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import matplotlib

# Before pyplot: servers and CI have no display. Jupyter's inline backend (ipykernel sets
# MPLBACKEND) also draws off-screen and is kept, or notebooks would show no figures.
if "inline" not in os.environ.get("MPLBACKEND", ""):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .attention import GateProfile
from .correlation import CONSTANT_STD, ClassCorrelation
from .faithfulness import Curve, Randomization
from .results import AnalysisResult, ModelResult

__all__ = ["overlay", "overlay_pair", "probe_chart", "group_grid", "gates_heatmap", "gates_lines",
           "channel_gates_chart", "model_gates_chart", "gates_across_depth",
           "correlation_matrices", "correlation_vs_depth", "faithfulness_curves", "randomization_chart",
           "randomization_strip", "save", "to_image", "CAM_CMAP", "BRANCH_COLOURS"]

CAM_CMAP = "jet"
BRANCH_COLOURS = {"channel": "#1f77b4", "spatial": "#ff7f0e"}
RESNET_COLOUR = "#7f7f7f"
UNTRAINED_NOTE = "UNTRAINED weights: not the published model"


def _subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot's global figure registry: a plain :class:`Figure` (drawn
    by Agg when saved) that threads may build concurrently, e.g. the CLI's background writer
    while the app's handlers draw. Nothing to close: it is freed with its last reference."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def overlay(display: np.ndarray, cam: np.ndarray, *, opacity: float = 0.5) -> np.ndarray:
    """The CAM over the image on one fixed [0, 1] colour scale; uint8 (H, W, 3)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be within [0, 1]")
    heat = plt.get_cmap(CAM_CMAP)(np.clip(cam, 0.0, 1.0))[..., :3]
    blended = (1.0 - opacity) * display.astype(np.float64) / 255.0 + opacity * heat
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def _weights_tag(m: ModelResult) -> str:
    return "" if m.weights.pretrained else f"\n{UNTRAINED_NOTE}"


def overlay_pair(result: AnalysisResult, *, opacity: float = 0.5) -> Figure:
    """Both models' overlays side by side, each with its top-5 and the class explained."""
    items = list(result.models.values())
    fig, axes = _subplots(1, len(items), figsize=(4.2 * len(items), 5.6), squeeze=False)
    for ax, m in zip(axes[0], items, strict=True):
        ax.imshow(overlay(result.display, m.cam, opacity=opacity))
        ax.set_axis_off()
        target = m.target_class
        ax.set_title(f"{m.display_name}: {m.cam_method} at {m.cam_layer}\nexplains {target} "
                     f"{_label(m, target)}{_weights_tag(m)}", fontsize=9,
                     color="black" if m.weights.pretrained else "#b00020")
        text = "\n".join(f"{p.prob:6.1%}  {p.label[:28]}" for p in m.top5)
        ax.text(0.0, -0.03, text, transform=ax.transAxes, va="top", family="monospace", fontsize=8)
    sm = ScalarMappable(cmap=CAM_CMAP, norm=Normalize(0, 1))
    fig.colorbar(sm, ax=axes[0].tolist(), fraction=0.025, pad=0.02, label="CAM (0-1)")
    return fig


def _label(m: ModelResult, index: int) -> str:
    if index == m.target_class:
        return m.target_label
    return next((p.label for p in m.top5 if p.index == index), "")


PROBE_YLABEL = "score with x masked by group k"
PROBE_EXPLAINED = ("score = softmax probability of the class the model predicts for the unmasked image, "
                   "when the input is multiplied by group k's map")


def probe_chart(result: AnalysisResult) -> Figure:
    """Per-group probe scores, one panel per probed model, each scaled to its own data with the
    unmasked score as a dashed reference line. SANet50's bars are coloured by SA branch."""
    probed = [m for m in result.models.values() if m.probe is not None]
    fig, axes = _subplots(len(probed) or 1, 1, figsize=(11, 2.9 * max(1, len(probed)) + 0.4),
                             squeeze=False, sharex=True)
    for ax, m in zip(axes[:, 0], probed, strict=False):
        probe = m.probe
        assert probe is not None
        scores = probe.scores.numpy()
        idx = np.arange(len(scores))
        if m.sa_gates is not None:
            # After the shuffle, even chunks of SA_5_3 hold channel-branch halves, odd ones spatial.
            colours = [BRANCH_COLOURS["channel"] if k % 2 == 0 else BRANCH_COLOURS["spatial"] for k in idx]
        else:
            colours = [RESNET_COLOUR] * len(scores)
        ax.bar(idx, scores, color=colours, width=0.8)
        ax.axhline(probe.unmasked_score, color="black", lw=1, ls="--")
        top = max(float(scores.max()), probe.unmasked_score)
        ax.set_ylim(0, top * 1.25 if top > 0 else 1)
        ax.set_ylabel(PROBE_YLABEL, fontsize=8)
        ax.set_title(f"{m.display_name}: group probe at {probe.paper_name} ({probe.layer}), class {probe.target_class} "
                     f"{_label(m, probe.target_class)}; dashed: unmasked score {probe.unmasked_score:.3f}; "
                     f"forwards in {m.precision}{_weights_tag(m)}", fontsize=9, loc="left",
                     color="black" if m.weights.pretrained else "#b00020")
        if m.sa_gates is not None:
            handles = [Rectangle((0, 0), 1, 1, color=c) for c in BRANCH_COLOURS.values()]
            # Legend below the plot area: it never covers bars or the title.
            ax.legend(handles, ["even k: channel-branch halves", "odd k: spatial-branch halves"], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("group k = chunk k of 32 consecutive channels of the block output", fontsize=8)
    fig.text(0.01, 0.005, PROBE_EXPLAINED, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def group_grid(maps: np.ndarray, *, title: str = "", cols: int = 8) -> Figure:
    """The G group maps as a grid (each normalised to its own range, as the probe does).

    One image of all maps with white gaps, not G sub-plots: about 10x faster to draw.
    """
    g, h, w = maps.shape
    rows = int(np.ceil(g / cols))
    mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for k in range(g):
        m = maps[k].astype(np.float64)
        span = m.max() - m.min()
        r, c = divmod(k, cols)
        mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = \
            (m - m.min()) / span if span > 0 else np.zeros_like(m)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, ax = _subplots(figsize=(cols * 1.1, rows * 1.1 + 0.4))
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for k in range(g):
        r, c = divmod(k, cols)
        ax.text(c * (w + 1) + 0.1, r * (h + 1) + 0.1, str(k), fontsize=6, color="white", va="top", ha="left",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


FLAT_GATES_NOTE = ("Every gate has the same value ({value:.3f} = sigmoid(1)): the SA layers still have their "
                   "initial parameters (weight 0, bias 1), i.e. SANet50 is untrained. Nothing here can be read "
                   "as what SA learned.")


def flat_gate_value(sa_gates: Mapping[str, Mapping[str, np.ndarray]]) -> float | None:
    """The one value of every gate when all gates are equal up to rounding (untrained SA), else None."""
    values = np.concatenate([np.asarray(g[b], np.float64).ravel() for g in sa_gates.values()
                             for b in ("channel", "spatial")])
    return float(values.mean()) if values.size and values.std() < CONSTANT_STD else None


def gates_heatmap(sa_gates: Mapping[str, Mapping[str, np.ndarray]], *, title: str = "") -> Figure:
    """Depth x group heatmaps of the mean channel and spatial gates of the 16 SA modules."""
    depths = list(sa_gates)
    fig, axes = _subplots(1, 2, figsize=(12, 0.3 * len(depths) + 1.9), squeeze=False)
    for ax, branch in zip(axes[0], ("channel", "spatial"), strict=True):
        grid = np.stack([np.asarray(sa_gates[d][branch]) for d in depths])
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(depths)), depths, fontsize=8)
        ax.set_xlabel("SA group (0-63)", fontsize=9)
        ax.set_title(f"mean {branch} gate per SA group", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.04, label="gate (0 closed, 1 open)")
    flat = flat_gate_value(sa_gates)
    fig.suptitle(title, fontsize=10)
    if flat is not None:  # below the panels, wrapped: it must never cover a title
        fig.text(0.5, 0.01, textwrap.fill(FLAT_GATES_NOTE.format(value=flat), 130), ha="center", va="bottom",
                 fontsize=8.5, color="#b00020")
    fig.tight_layout(rect=(0, 0.07 if flat is not None else 0, 1, 1))
    return fig


def gates_lines(sa_gates: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Per-stage lines: mean (over groups) channel and spatial gate at each SA module."""
    depths = list(sa_gates)
    fig, ax = _subplots(figsize=(8, 3.2))
    for branch, colour in BRANCH_COLOURS.items():
        values = [float(np.mean(sa_gates[d][branch])) for d in depths]
        ax.plot(range(len(depths)), values, marker="o", color=colour, label=f"{branch} gate")
    _stage_lines(ax, depths)
    ax.set_xticks(range(len(depths)), depths, rotation=60, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean gate over the 64 groups", fontsize=9)
    ax.set_title("How open the SA gates are, module by module (stage boundaries in grey)", fontsize=9)
    flat = flat_gate_value(sa_gates)
    if flat is not None:
        ax.text(0.5, 0.2, "flat: untrained SA layers (every gate = sigmoid(1))", transform=ax.transAxes,
                ha="center", fontsize=8, color="#b00020")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _stage_lines(ax: Any, depths: Sequence[str]) -> None:
    """Grey vertical lines between stages (depth names end in _<stage>_<block>)."""
    stages = [d.split("_")[-2] for d in depths]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5, color="#cccccc", lw=1)


def channel_gates_chart(profile: GateProfile, *, title: str = "", untrained: bool = False) -> Figure:
    """A channel-attention model's gates (SE, ECA: one per channel), module by module: the spread
    over the module's channels (box 25-75%, whiskers 5-95%) and their mean (dot)."""
    depths = profile.depths
    data = [np.asarray(profile.values[d]["channel"], np.float64) for d in depths]
    fig, ax = _subplots(figsize=(10, 3.6))
    ax.boxplot(data, positions=range(len(depths)), whis=(5, 95), showfliers=False, widths=0.6, patch_artist=True,
               boxprops={"facecolor": "#c6dbef", "edgecolor": BRANCH_COLOURS["channel"]},
               medianprops={"color": BRANCH_COLOURS["channel"]})
    ax.plot(range(len(depths)), [float(v.mean()) for v in data], "o", ms=4, color="black", label="mean over channels")
    _stage_lines(ax, depths)
    ax.set_xticks(range(len(depths)), [f"{d}\n{len(v)} ch" for d, v in zip(depths, data, strict=True)],
                  rotation=60, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate (0 closed, 1 open)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    heading = title or f"{profile.layout.title} gates, module by module"
    ax.set_title(f"{heading}: one gate per channel (box: 25-75% of the channels, whiskers 5-95%)"
                 + (f"\n{UNTRAINED_NOTE}" if untrained else ""), fontsize=9,
                 color="#b00020" if untrained else "black")
    fig.tight_layout()
    return fig


def model_gates_chart(m: ModelResult) -> Figure | None:
    """The gates picture of one model: SA's depth x group heatmaps, SE's and ECA's per-channel
    spreads; None for a model without attention gates."""
    if m.sa_gates:
        return gates_heatmap(m.sa_gates, title=f"{m.display_name}: SA gates across depth{_weights_tag(m)}")
    if m.gates is not None:
        return channel_gates_chart(m.gates, title=f"{m.display_name}: {m.gates.layout.kind} gates",
                                   untrained=not m.weights.pretrained)
    return None


GATE_MODEL_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b")


def gates_across_depth(results: Sequence[ModelResult]) -> Figure:
    """Every gated model's gates on one axis of depth (stage_block 2_1 ... 5_3): per module and
    branch the mean gate (line) and the middle half of its groups or channels (band), each in the
    unit it has (SA: the 64 groups' mean channel and spatial gates; SE, ECA: per channel)."""
    gated = [m for m in results if m.gates is not None]
    positions = sorted({d.split("_", 1)[1] for m in gated for d in m.gates.depths},  # type: ignore[union-attr]
                       key=lambda p: tuple(int(v) for v in p.split("_")))
    fig, ax = _subplots(figsize=(10, 3.8))
    untrained = False
    for i, m in enumerate(gated):
        profile = m.gates
        assert profile is not None
        colour = GATE_MODEL_COLOURS[i % len(GATE_MODEL_COLOURS)]
        where = [positions.index(d.split("_", 1)[1]) for d in profile.depths]
        for branch in profile.layout.branches:
            values = [np.asarray(profile.values[d][branch], np.float64) for d in profile.depths]
            unit = "its 64 groups" if profile.layout.unit == "group" else "its channels"
            tag = "" if m.weights.pretrained else " (UNTRAINED)"
            untrained |= not m.weights.pretrained
            style = "-" if branch == "channel" else "--"
            ax.plot(where, [float(v.mean()) for v in values], style, marker="o", ms=3, color=colour,
                    label=f"{m.display_name}{tag}: {profile.layout.kind} {branch} gate, mean over {unit}")
            ax.fill_between(where, [float(np.percentile(v, 25)) for v in values],
                            [float(np.percentile(v, 75)) for v in values], color=colour, alpha=0.12, lw=0)
    _stage_lines(ax, [f"x_{p}" for p in positions])
    ax.set_xticks(range(len(positions)), positions, fontsize=8)
    ax.set_xlabel("depth: stage_block (stage 2-5 = layer1-layer4)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate (0 closed, 1 open)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Attention gates across depth, each in its own unit (band: middle half of the groups or "
                 "channels)" + (f"\n{UNTRAINED_NOTE}" if untrained else ""), fontsize=9,
                 color="#b00020" if untrained else "black")
    fig.tight_layout()
    return fig


UNDEFINED_COLOUR = "#bdbdbd"


def correlation_matrices(corr: ClassCorrelation, depths: Sequence[str] | None = None,
                         class_names: Sequence[str] | None = None) -> Figure:
    """Class x class correlation matrices at chosen depths (default: first, middle and last).

    Undefined entries (constant profiles) are grey, and a title says "undefined" rather than a number.
    """
    chosen = list(depths) if depths else [corr.depths[0], corr.depths[len(corr.depths) // 2], corr.depths[-1]]
    names = list(class_names) if class_names else [str(c) for c in corr.classes]
    cmap = plt.get_cmap("coolwarm").with_extremes(bad=UNDEFINED_COLOUR)
    fig, axes = _subplots(1, len(chosen), figsize=(3.8 * len(chosen), 4.0), squeeze=False)
    for ax, depth in zip(axes[0], chosen, strict=True):
        im = ax.imshow(np.ma.masked_invalid(corr.matrices[depth]), cmap=cmap, vmin=-1, vmax=1)
        r = corr.mean_between[depth]
        ax.set_title(f"{depth}: mean between-class r = {'undefined' if np.isnan(r) else f'{r:.2f}'}", fontsize=9)
        if len(names) <= 20:
            ax.set_xticks(range(len(names)), [n[:12] for n in names], rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), [n[:12] for n in names], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="Pearson r (grey: undefined)")
    return fig


def correlation_vs_depth(corr: ClassCorrelation, *, label: str = "") -> Figure:
    """Mean between-class correlation against SA depth; undefined depths greyed, with the reason."""
    fig, ax = _subplots(figsize=(8, 3.4))
    x = np.arange(len(corr.depths))
    values = np.array([corr.mean_between[d] for d in corr.depths], dtype=np.float64)
    defined = ~np.isnan(values)
    if defined.any():
        ax.plot(x[defined], values[defined], marker="o", color=BRANCH_COLOURS["channel"], label=label or None)
    for i in np.flatnonzero(~defined):
        ax.axvspan(i - 0.4, i + 0.4, color=UNDEFINED_COLOUR, alpha=0.5, lw=0)
    ax.set_xticks(x, corr.depths, rotation=60, fontsize=8)
    ax.set_ylabel("mean between-class r", fontsize=9)
    ax.set_ylim(min(-0.05, float(np.nanmin(values)) - 0.05) if defined.any() else -1.05, 1.05)
    ax.set_title(f"Between-class correlation of mean SA profiles, {len(corr.classes)} classes "
                 "(paper: high early, falling with depth)", fontsize=9)
    reasons = sorted({corr.notes[d] for d in corr.depths if d in corr.notes and not corr.defined(d)})
    if reasons:
        ax.text(0.5, 0.5 if not defined.any() else 0.1, textwrap.fill("grey: undefined - " + "; ".join(reasons), 70),
                transform=ax.transAxes, ha="center", va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": UNDEFINED_COLOUR, "boxstyle": "round"})
    if label and defined.any():
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def to_image(fig: Figure, *, dpi: int = 100) -> np.ndarray:
    """Render ``fig`` to an RGB array and close it (figures left open pile up in a server)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _close(fig)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def save(fig: Figure, path: str, *, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _close(fig)


def _close(fig: Figure) -> None:
    """Release a pyplot figure (callers may pass one); ours are not in pyplot's registry, and
    leaving that registry alone keeps them safe to draw from several threads."""
    if fig.canvas.manager is not None:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Faithfulness (issue 14): curves, the randomisation cascade. Inputs are plain results, so the
# app, export and reproduce (curves averaged over images) draw the same pictures.

FAITHFULNESS_COLOURS = (RESNET_COLOUR, BRANCH_COLOURS["channel"], "#2ca02c", "#d62728")


def faithfulness_curves(curves: Mapping[str, tuple[Curve, Curve]], *, untrained: Collection[str] = (),
                        title: str = "") -> Figure:
    """Deletion and insertion curves of every model (name -> (deletion, insertion)), AUCs in the legend.

    x: the share of pixels deleted or inserted, most relevant first; y: softmax[c].
    """
    fig, axes = _subplots(1, 2, figsize=(10, 3.6), sharey=True, squeeze=False)
    panels = (("Deletion: lower AUC = more faithful", "share of pixels deleted (set to the mean colour)", "upper"),
              ("Insertion: higher AUC = more faithful", "share of pixels inserted into the blurred image", "lower"))
    for col, (ax, (heading, xlabel, corner)) in enumerate(zip(axes[0], panels, strict=True)):
        for i, (name, pair) in enumerate(curves.items()):
            curve = pair[col]
            steps = len(curve.scores) - 1
            tag = " (UNTRAINED)" if name in untrained else ""
            ax.plot(np.arange(steps + 1) / steps, curve.scores, marker="o", ms=2.5, lw=1.5,
                    color=FAITHFULNESS_COLOURS[i % len(FAITHFULNESS_COLOURS)],
                    label=f"{name}{tag}: AUC {curve.auc:.3f}")
        ax.set_title(heading, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc=f"{corner} right")
    axes[0, 0].set_ylabel("softmax of the explained class")
    note = f"\n{UNTRAINED_NOTE}" if untrained else ""
    fig.suptitle(f"{title}{note}", fontsize=9, color="#b00020" if untrained else "black")
    fig.tight_layout()
    return fig


def randomization_chart(cascades: Mapping[str, Randomization], *, untrained: Collection[str] = ()) -> Figure:
    """Spearman (solid) and SSIM (dashed) of each model's CAM with its original as blocks are
    randomised, classifier first, from 1 (the original itself); a faithful map's similarity falls."""
    fig, ax = _subplots(figsize=(10, 3.6))
    labels: list[str] = []
    for i, (name, r) in enumerate(cascades.items()):
        colour = FAITHFULNESS_COLOURS[i % len(FAITHFULNESS_COLOURS)]
        tag = " (UNTRAINED)" if name in untrained else ""
        x = np.arange(len(r.names) + 1)
        ax.plot(x, [1.0, *r.spearman], marker="o", ms=3, color=colour, label=f"{name}{tag}: Spearman")
        ax.plot(x, [1.0, *r.ssim], marker="s", ms=3, ls="--", color=colour, label=f"{name}{tag}: SSIM")
        labels = [f"{a} / {b}" if a != b else a for a, b in zip(labels, r.names, strict=True)] if labels \
            else list(r.names)
    ax.set_xticks(range(len(labels) + 1), ["original", *(f"+{n}" for n in labels)], rotation=60, fontsize=7)
    ax.axhline(0, color="#cccccc", lw=1)
    ax.set_ylim(-1.02, 1.02)
    ax.set_ylabel("similarity with the original CAM")
    ax.set_xlabel("blocks re-initialised so far (cumulative, classifier first)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Randomisation sanity check: a map that does not change when the model is destroyed explains "
                 "nothing" + (f"\n{UNTRAINED_NOTE}" if untrained else ""), fontsize=9,
                 color="#b00020" if untrained else "black")
    fig.tight_layout()
    return fig


def randomization_strip(original: np.ndarray, cascade: Randomization, *, display: np.ndarray | None = None,
                        opacity: float = 0.5, title: str = "") -> Figure:
    """The original CAM and the CAM after each cascade step, in a row (over the image if given)."""
    maps = [original, *cascade.cams]
    names = ["original", *(f"+{n}" for n in cascade.names)]
    fig, axes = _subplots(1, len(maps), figsize=(1.05 * len(maps), 1.6), squeeze=False)
    for k, (ax, cam, name) in enumerate(zip(axes[0], maps, names, strict=True)):
        ax.imshow(overlay(display, cam, opacity=opacity) if display is not None else cam,
                  cmap=None if display is not None else CAM_CMAP, vmin=0, vmax=1)
        rho = "" if k == 0 else f"\nr={cascade.spearman[k - 1]:.2f}"
        ax.set_title(f"{name}{rho}", fontsize=6)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
