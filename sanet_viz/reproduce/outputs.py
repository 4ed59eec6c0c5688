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

from .. import charts
from ..correlation import ClassCorrelation
from ..profiles import ClassProfiles
from . import faithfulness as faith
from .result import ReproduceResult, depth_position

__all__ = ["write_outputs", "group_accuracy_figure", "profiles_of"]


def write_outputs(result: ReproduceResult, out: str | Path, *, figure_classes: Sequence[int] | None = None,
                  data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """summary.json, accuracy.csv, group_accuracy.csv, per_class.csv, and per gated model (SA, SE,
    ECA) correlation_vs_depth{suffix}.csv, profiles{suffix}.npz and figures (:func:`suffix_of`);
    with two or more gated models correlation_vs_depth_all.csv/.png on one axis of depth; returns
    name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = result.summary()
    if data is not None:
        summary["data"] = dict(data)
    gated = result.gated()
    correlations = {k: result.class_correlation(k) for k in gated if len(result.present_classes()) >= 2}
    tables = {"accuracy.csv": _accuracy_rows(result), "group_accuracy.csv": _group_rows(result),
              "per_class.csv": _per_class_rows(result)}
    tables.update({f"correlation_vs_depth{suffix_of(k, gated)}.csv": _correlation_rows(result, {k: corr})
                   for k, corr in correlations.items()})
    if len(correlations) >= 2:
        tables["correlation_vs_depth_all.csv"] = _across_rows(result, correlations)
    for name, rows in tables.items():
        if rows:
            with open(out / name, "w", newline="") as f:
                csv.writer(f).writerows(rows)
            written[name] = out / name
    for k in gated:
        name = f"profiles{suffix_of(k, gated)}.npz"
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


def suffix_of(key: str, gated: Sequence[str]) -> str:
    """The file-name suffix of a gated model's outputs: none for SANet50 or a lone gated model
    (profiles.npz, correlation_vs_depth.png, ...), else ``_<key>`` (profiles_seresnet50.npz)."""
    return "" if key == "sanet50" or len(gated) == 1 else f"_{key}"


def _correlation_rows(result: ReproduceResult, correlations: Mapping[str, ClassCorrelation]) -> list[list[Any]]:
    if not correlations:
        return []
    rows: list[list[Any]] = [["model", "depth", "module", "mean_between_class_correlation", "classes"]]
    for k, corr in correlations.items():
        modules = result.models[k]["gates"]["modules"]
        rows += [[k, d, modules[d], _fmt(corr.mean_between[d]), len(corr.classes)] for d in corr.depths]
    return rows


def _across_rows(result: ReproduceResult, correlations: Mapping[str, ClassCorrelation]) -> list[list[Any]]:
    """Every gated model on one axis of depth: position (stage_block), then each model's mean
    between-class correlation there ("nan" undefined, empty where the model has no module)."""
    positions = result.correlation_across_models()["positions"]
    rows: list[list[Any]] = [["position"] + [f"{k}_mean_between_class_correlation" for k in correlations]]
    for p in positions:
        row: list[Any] = [p]
        for corr in correlations.values():
            at = {depth_position(d): d for d in corr.depths}
            row.append(_fmt(corr.mean_between[at[p]]) if p in at else "")
        rows.append(row)
    return rows


def profiles_of(result: ReproduceResult, key: str) -> ClassProfiles:
    """Model ``key``'s per-class mean gate profiles over the run (what the app's ``--profiles``
    loads): SA's channel and spatial means per group, SE's and ECA's per channel."""
    classes, channel, spatial = result.class_profiles(key)
    m = result.models[key]
    gates = m["gates"]
    return ClassProfiles(classes.astype(np.int64), [result.label(int(c)) for c in classes],
                         result.sums["class_images"][classes].astype(np.int64), list(gates["depths"]),
                         channel.astype(np.float32), None if spatial is None else spatial.astype(np.float32), key,
                         bool(m["pretrained"]), str(m["weights"]["source"]), result.images, kind=gates["kind"],
                         unit=gates["unit"], widths=tuple(int(w) for w in gates["widths"]))


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
    gated = result.gated()
    for k, corr in correlations.items():
        m = result.models[k]
        kind = m["gates"]["kind"]
        suffix = suffix_of(k, gated)
        tag = "" if m["pretrained"] else " (UNTRAINED)"
        fig = charts.correlation_vs_depth(corr, label=f"{m['display_name']}{tag}, {result.images} images")
        if kind != "SA":  # the chart's own title speaks of SA profiles
            fig.axes[0].set_title(f"Between-class correlation of mean {kind} profiles (one gate per channel), "
                                  f"{len(corr.classes)} classes (SA paper: high early, falling with depth)",
                                  fontsize=9)
        charts.save(fig, str(out / f"correlation_vs_depth{suffix}.png"))
        written[f"correlation_vs_depth{suffix}.png"] = out / f"correlation_vs_depth{suffix}.png"
        chosen = _choose_classes(corr.classes, figure_classes)
        rows = [corr.classes.index(c) for c in chosen]
        sub = ClassCorrelation(corr.depths, chosen, {d: mat[np.ix_(rows, rows)] for d, mat in corr.matrices.items()},
                               corr.mean_between)
        fig = charts.correlation_matrices(sub, class_names=[f"{c} {result.label(c)}" for c in chosen])
        fig.suptitle(f"{m['display_name']}{tag}: class x class correlation of mean {kind} profiles "
                     f"({len(chosen)} of {len(corr.classes)} classes shown; r in titles: all classes)",
                     fontsize=9)
        charts.save(fig, str(out / f"correlation_matrices{suffix}.png"))
        written[f"correlation_matrices{suffix}.png"] = out / f"correlation_matrices{suffix}.png"
    if len(correlations) >= 2:
        fig = correlation_across_figure(result, correlations)
        charts.save(fig, str(out / "correlation_vs_depth_all.png"))
        written["correlation_vs_depth_all.png"] = out / "correlation_vs_depth_all.png"
    return written


def _position_key(position: str) -> tuple[int, ...]:
    return tuple(int(v) for v in position.split("_"))


def correlation_across_figure(result: ReproduceResult, correlations: Mapping[str, ClassCorrelation]) -> Any:
    """Every gated model's mean between-class correlation on one axis of depth (stage_block
    2_1 ... 5_3), each in its own unit; undefined depths (constant profiles) as crosses at the
    bottom; untrained models tagged, and the title says so."""
    plt = charts.plt
    positions = sorted({depth_position(d) for c in correlations.values() for d in c.depths}, key=_position_key)
    fig, ax = plt.subplots(figsize=(12.5, 4.0))
    defined_values = [v for c in correlations.values() for v in c.mean_between.values() if not np.isnan(v)]
    low = min(-0.05, min(defined_values) - 0.05) - 0.05 * len(correlations) if defined_values else -1.05
    untrained, undefined_any = [], False
    for i, (k, corr) in enumerate(correlations.items()):
        m = result.models[k]
        gates = m["gates"]
        colour = charts.GATE_MODEL_COLOURS[i % len(charts.GATE_MODEL_COLOURS)]
        xs = np.array([positions.index(depth_position(d)) for d in corr.depths])
        values = np.array([corr.mean_between[d] for d in corr.depths], dtype=np.float64)
        defined = ~np.isnan(values)
        unit = "64 groups x channel, spatial" if gates["unit"] == "group" else "one gate per channel"
        tag = "" if m["pretrained"] else " (UNTRAINED)"
        if not m["pretrained"]:
            untrained.append(m["display_name"])
        label = f"{m['display_name']}{tag}: {gates['kind']} ({unit})"
        if not defined.all():
            undefined_any = True
            label += f";\nundefined (x) at {int((~defined).sum())} of {len(values)} depths"
        ax.plot(xs[defined], values[defined], marker="o", ms=4, color=colour, label=label)
        ax.plot(xs[~defined], np.full(int((~defined).sum()), low + 0.03 + 0.05 * i), "x", ms=6, color=colour)
    for j in range(1, len(positions)):
        if positions[j].split("_")[0] != positions[j - 1].split("_")[0]:
            ax.axvline(j - 0.5, color="#cccccc", lw=1)
    ax.set_xticks(range(len(positions)), positions, fontsize=8)
    ax.set_xlabel("depth: stage_block (stage 2-5 = layer1-layer4)"
                  + ("; x at the bottom: undefined (constant class profiles)" if undefined_any else ""), fontsize=8)
    ax.set_ylim(low, 1.05)
    ax.set_ylabel("mean between-class r", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    title = (f"Between-class correlation of mean gate profiles across depth, {len(result.present_classes())} "
             f"classes, {result.images} images (SA paper: shared early, class-specific late)")
    if untrained:
        title += f"\n{charts.UNTRAINED_NOTE}: {', '.join(untrained)}"
    ax.set_title(title, fontsize=9, color="#b00020" if untrained else "black")
    fig.tight_layout()
    return fig


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


