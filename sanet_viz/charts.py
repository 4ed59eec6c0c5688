"""Pictures of analysis results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: servers and CI have no display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .correlation import ClassCorrelation
from .results import AnalysisResult, ModelResult

__all__ = ["overlay", "overlay_pair", "probe_chart", "group_grid", "gates_heatmap", "gates_lines",
           "correlation_matrices", "correlation_vs_depth", "save", "to_image", "CAM_CMAP", "BRANCH_COLOURS"]

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


def probe_chart(result: AnalysisResult) -> Figure:
    """Per-group probe scores: SANet50 bars coloured by SA branch, ResNet50 beside them."""
    probed = [m for m in result.models.values() if m.probe is not None]
    fig, axes = _subplots(len(probed) or 1, 1, figsize=(11, 2.6 * max(1, len(probed))),
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
        ax.axhline(probe.unmasked_score, color="black", lw=1, ls="--",
                   label=f"unmasked {probe.unmasked_score:.3f}")
        ax.set_ylim(0, 1)
        ax.set_ylabel("softmax[c]")
        ax.set_title(f"{m.display_name}: group probe at {probe.paper_name} ({probe.layer}), class "
                     f"{probe.target_class} {_label(m, probe.target_class)}{_weights_tag(m)}; masked forwards "
                     f"in {m.precision}", fontsize=9)
        handles = [Rectangle((0, 0), 1, 1, color=c) for c in BRANCH_COLOURS.values()] \
            if m.sa_gates is not None else []
        labels = ["channel-branch chunk (even)", "spatial-branch chunk (odd)"] if handles else []
        line = ax.get_legend_handles_labels()
        ax.legend(handles + line[0], labels + line[1], fontsize=7, loc="upper right", ncol=3)
    axes[-1, 0].set_xlabel("group k (32 consecutive channels of the block output)")
    fig.tight_layout()
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
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
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


def gates_heatmap(sa_gates: Mapping[str, Mapping[str, np.ndarray]], *, title: str = "") -> Figure:
    """Depth x group heatmaps of the mean channel and spatial gates of the 16 SA modules."""
    depths = list(sa_gates)
    fig, axes = _subplots(1, 2, figsize=(12, 0.3 * len(depths) + 1.6), squeeze=False)
    for ax, branch in zip(axes[0], ("channel", "spatial"), strict=True):
        grid = np.stack([np.asarray(sa_gates[d][branch]) for d in depths])
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(depths)), depths, fontsize=7)
        ax.set_xlabel("group")
        ax.set_title(f"mean {branch} gate", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def gates_lines(sa_gates: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Per-stage lines: mean (over groups) channel and spatial gate at each SA module."""
    depths = list(sa_gates)
    fig, ax = _subplots(figsize=(8, 3))
    for branch, colour in BRANCH_COLOURS.items():
        values = [float(np.mean(sa_gates[d][branch])) for d in depths]
        ax.plot(range(len(depths)), values, marker="o", color=colour, label=f"{branch} gate")
    stages = [d.split("_")[1] for d in depths]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5, color="#cccccc", lw=1)
    ax.set_xticks(range(len(depths)), depths, rotation=60, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over groups")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def correlation_matrices(corr: ClassCorrelation, depths: Sequence[str] | None = None,
                         class_names: Sequence[str] | None = None) -> Figure:
    """Class x class correlation matrices at chosen depths (default: first, middle and last)."""
    chosen = list(depths) if depths else [corr.depths[0], corr.depths[len(corr.depths) // 2], corr.depths[-1]]
    names = list(class_names) if class_names else [str(c) for c in corr.classes]
    fig, axes = _subplots(1, len(chosen), figsize=(3.8 * len(chosen), 3.8), squeeze=False)
    for ax, depth in zip(axes[0], chosen, strict=True):
        im = ax.imshow(corr.matrices[depth], cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_title(f"{depth}: mean between-class r = {corr.mean_between[depth]:.2f}", fontsize=8)
        if len(names) <= 20:
            ax.set_xticks(range(len(names)), [n[:12] for n in names], rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), [n[:12] for n in names], fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    return fig


def correlation_vs_depth(corr: ClassCorrelation, *, label: str = "") -> Figure:
    """Mean between-class correlation against SA depth."""
    fig, ax = _subplots(figsize=(8, 3))
    values = [corr.mean_between[d] for d in corr.depths]
    ax.plot(range(len(values)), values, marker="o", color=BRANCH_COLOURS["channel"], label=label or None)
    ax.set_xticks(range(len(values)), corr.depths, rotation=60, fontsize=7)
    ax.set_ylabel("mean between-class r")
    ax.set_ylim(min(-0.05, np.nanmin(values) - 0.05) if values else -1, 1.02)
    ax.set_title(f"{len(corr.classes)} classes: early layers shared, late layers class-specific?", fontsize=9)
    if label:
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
