"""What ``reproduce`` writes: summary.json, CSV tables, figures and the app's profiles.npz."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import charts, models
from ..correlation import ClassCorrelation
from ..profiles import ClassProfiles
from . import faithfulness as faith
from .result import ReproduceResult

__all__ = ["write_outputs", "group_accuracy_figure", "profiles_of"]


def write_outputs(result: ReproduceResult, out: str | Path, *, figure_classes: Sequence[int] | None = None,
                  data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """summary.json, accuracy.csv, group_accuracy.csv, per_class.csv, correlation_vs_depth.csv,
    profiles.npz (SA models) and the figures; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = result.summary()
    if data is not None:
        summary["data"] = dict(data)
    sa_keys = [k for k in result.models if result.models[k]["sa_depths"]]
    correlations = {k: result.class_correlation(k) for k in sa_keys if len(result.present_classes()) >= 2}
    tables = {"accuracy.csv": _accuracy_rows(result), "group_accuracy.csv": _group_rows(result),
              "per_class.csv": _per_class_rows(result), "correlation_vs_depth.csv": _correlation_rows(correlations)}
    for name, rows in tables.items():
        if rows:
            with open(out / name, "w", newline="") as f:
                csv.writer(f).writerows(rows)
            written[name] = out / name
    for k in sa_keys:
        name = "profiles.npz" if k == "sanet50" or len(sa_keys) == 1 else f"profiles_{k}.npz"
        written[name] = profiles_of(result, k).save(out / name)
    written.update(_write_figures(result, out, correlations, figure_classes))
    written.update(faith.write_files(result.sums, result.models, summary.get("faithfulness"), out,
                                     sample_paths=result.sample_paths))
    summary["files"] = sorted(set(written) | {"summary.json"})
    path = out / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    written["summary.json"] = path
    return written


def _accuracy_rows(result: ReproduceResult) -> list[list[Any]]:
    return [["model", "display_name", "pretrained", "images", "correct", "top1", "mean_group_top1",
             "probe_layer"]] + [
        [k, m["display_name"], m["pretrained"], result.images, int(result.sums[f"{k}.correct"]),
         _fmt(result.top1(k)), _fmt(float(g.mean())) if (g := result.group_top1(k)) is not None else "",
         m["probe_layer"]] for k, m in result.models.items()]


def _group_rows(result: ReproduceResult) -> list[list[Any]]:
    """Per group k and probed model: top-1 of x * a_k, its count and the mean score; then unmasked."""
    probed = {k: top for k in result.models if (top := result.group_top1(k)) is not None}
    if not probed:
        return []
    rows: list[list[Any]] = [["group"] + [f"{k}_{c}" for k in probed for c in ("top1", "correct", "mean_score")]]
    for g in range(max(len(top) for top in probed.values())):
        row: list[Any] = [g]
        for k, top in probed.items():
            row += [_fmt(float(top[g])), int(result.sums[f"{k}.group_correct"][g]),
                    _fmt(float(result.sums[f"{k}.group_score"][g]) / max(result.images, 1))] if g < len(top) \
                else ["", "", ""]
        rows.append(row)
    unmasked = [(_fmt(result.top1(k)), int(result.sums[f"{k}.correct"]), "") for k in probed]
    rows.append(["unmasked", *(v for cells in unmasked for v in cells)])
    return rows


def _per_class_rows(result: ReproduceResult) -> list[list[Any]]:
    keys = list(result.models)
    return [["class", "label", "images"] + [f"{k}_top1" for k in keys]] + [
        [int(c), result.label(int(c)), int(result.sums["class_images"][c])]
        + [_fmt(int(result.sums[f"{k}.class_correct"][c]) / int(result.sums["class_images"][c])) for k in keys]
        for c in result.present_classes()]


def _correlation_rows(correlations: Mapping[str, ClassCorrelation]) -> list[list[Any]]:
    if not correlations:
        return []
    rows: list[list[Any]] = [["model", "depth", "module", "mean_between_class_correlation", "classes"]]
    for k, corr in correlations.items():
        rows += [[k, d, models.paper_name_to_module(d) + ".sa", _fmt(corr.mean_between[d]), len(corr.classes)]
                 for d in corr.depths]
    return rows


def profiles_of(result: ReproduceResult, key: str) -> ClassProfiles:
    """Model ``key``'s per-class mean SA profiles over the run (what the app's ``--profiles`` loads)."""
    classes, channel, spatial = result.class_profiles(key)
    m = result.models[key]
    return ClassProfiles(classes.astype(np.int64), [result.label(int(c)) for c in classes],
                         result.sums["class_images"][classes].astype(np.int64), list(m["sa_depths"]),
                         channel.astype(np.float32), spatial.astype(np.float32), key, bool(m["pretrained"]),
                         str(m["weights"]["source"]), result.images)


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.6f}"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_figures(result: ReproduceResult, out: Path, correlations: Mapping[str, ClassCorrelation],
                   figure_classes: Sequence[int] | None) -> dict[str, Path]:
    written = {}
    if any(result.group_top1(k) is not None for k in result.models):
        fig = group_accuracy_figure(result)
        charts.save(fig, str(out / "group_accuracy.png"))
        written["group_accuracy.png"] = out / "group_accuracy.png"
    for k, corr in correlations.items():
        m = result.models[k]
        suffix = "" if k == "sanet50" or len(correlations) == 1 else f"_{k}"
        tag = "" if m["pretrained"] else " (UNTRAINED)"
        fig = charts.correlation_vs_depth(corr, label=f"{m['display_name']}{tag}, {result.images} images")
        charts.save(fig, str(out / f"correlation_vs_depth{suffix}.png"))
        written[f"correlation_vs_depth{suffix}.png"] = out / f"correlation_vs_depth{suffix}.png"
        chosen = _choose_classes(corr.classes, figure_classes)
        rows = [corr.classes.index(c) for c in chosen]
        sub = ClassCorrelation(corr.depths, chosen, {d: mat[np.ix_(rows, rows)] for d, mat in corr.matrices.items()},
                               corr.mean_between)
        fig = charts.correlation_matrices(sub, class_names=[f"{c} {result.label(c)}" for c in chosen])
        fig.suptitle(f"{m['display_name']}{tag}: class x class correlation of mean SA profiles "
                     f"({len(chosen)} of {len(corr.classes)} classes shown; r in titles: all classes)",
                     fontsize=9)
        charts.save(fig, str(out / f"correlation_matrices{suffix}.png"))
        written[f"correlation_matrices{suffix}.png"] = out / f"correlation_matrices{suffix}.png"
    return written


def _choose_classes(present: list[int], wanted: Sequence[int] | None, most: int = 12) -> list[int]:
    if wanted:
        missing = [c for c in wanted if c not in present]
        if missing:
            print(f"warning: --figure-classes: {missing} have no images in this run; left out of the figure",
                  file=sys.stderr)
        chosen = [c for c in dict.fromkeys(wanted) if c in present]
        if len(chosen) >= 1:
            return chosen
    if len(present) <= most:
        return list(present)
    return [present[int(i)] for i in np.linspace(0, len(present) - 1, most).round()]


def group_accuracy_figure(result: ReproduceResult) -> Any:
    """Group k vs top-1 of x * a_k, one panel per model, the unmasked top-1 as a dashed line."""
    plt = charts.plt
    keys = [k for k in result.models if result.group_top1(k) is not None]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 2.8 * len(keys)), squeeze=False, sharex=True, sharey=True)
    top = max([result.top1(k) for k in keys]
              + [float(result.group_top1(k).max()) for k in keys])  # type: ignore[union-attr]
    for ax, key in zip(axes[:, 0], keys, strict=True):
        m = result.models[key]
        acc = result.group_top1(key) * 100  # type: ignore[operator]
        idx = np.arange(len(acc))
        if m["sa_depths"]:  # SA_5_3's output: even chunks hold channel-branch halves, odd spatial
            colours = [charts.BRANCH_COLOURS["channel" if i % 2 == 0 else "spatial"] for i in idx]
        else:
            colours = [charts.RESNET_COLOUR] * len(acc)
        ax.bar(idx, acc, color=colours, width=0.8)
        ax.axhline(result.top1(key) * 100, color="black", lw=1.2, ls="--",
                   label=f"unmasked top-1 {result.top1(key):.2%}")
        handles, labels = ax.get_legend_handles_labels()
        if m["sa_depths"]:
            handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in charts.BRANCH_COLOURS.values()] + handles
            labels = ["channel-branch chunk (even k)", "spatial-branch chunk (odd k)", *labels]
        ax.legend(handles, labels, fontsize=7, loc="upper right", ncol=3)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, max(1.0, top * 100 * 1.15))
        name = m["probe_paper_name"] or m["probe_layer"]
        warn = "" if m["pretrained"] else f"\n{charts.UNTRAINED_NOTE}"
        ax.set_title(f"{m['display_name']}: top-1 of x * a_k, group k of {name} ({m['probe_layer']}), "
                     f"{result.images} images; mean over groups {float(acc.mean()):.2f}%{warn}",
                     fontsize=9, color="black" if m["pretrained"] else "#b00020")
    axes[-1, 0].set_xlabel("group k (k-th chunk of consecutive channels of the block output)")
    fig.tight_layout()
    return fig


