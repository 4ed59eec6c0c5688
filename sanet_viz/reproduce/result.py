"""A data-set run's outcome: every rank's sums and counts, and the figures derived from them."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..correlation import CONSTANT_STD, SA_CONSTANT_HINT, ClassCorrelation, correlation_of_means
from ..weights import untrained_warning
from . import faithfulness as faith

__all__ = ["ReproduceResult", "device_info", "gate_sum_key", "depth_position"]


# What makes every gate of a kind constant, for the reason an undefined correlation gives.
CONSTANT_HINTS = {
    "SA": SA_CONSTANT_HINT,
    "SE": "untrained SE modules?",
    "ECA": "untrained ECA: timm zero-initialises each block's last BatchNorm, so every gate is sigmoid(0) = 0.5",
}


def gate_sum_key(model: str, depth: str, branch: str) -> str:
    """The run's sum of every image's ``branch`` gates at ``depth``, per class: (classes, width).

    One tensor per depth and branch, because widths differ with depth for SE and ECA (one gate
    per channel: 256 ... 2048) while SA has its 64 groups everywhere; sums of any shape add up
    over ranks and over checkpointed sessions alike."""
    return f"{model}.gates.{depth}.{branch}"


def depth_position(depth: str) -> str:
    """``"SE_5_3"`` -> ``"5_3"``: stage and block, the axis every gated model shares."""
    return depth.split("_", 1)[1]


@dataclass
class ReproduceResult:
    """The data-set figures: sums and counts of every rank, and how the run went."""

    sums: dict[str, np.ndarray]
    models: dict[str, dict[str, Any]]  # key -> display_name, weights, pretrained, probe layer, depths
    categories: list[str]
    decode_error_examples: list[str]
    device: dict[str, Any]
    precision: str
    world_size: int
    seconds: float  # wall time of this session's loop (slowest rank)
    seconds_total: float  # including earlier sessions whose sums were resumed (slowest rank)
    images_this_session: int  # all ranks
    images_resumed: int  # taken from saved states
    faithfulness: dict[str, Any] | None = None  # what was measured (faithfulness.settings), when asked
    sample_paths: list[str] | None = None  # the run's samples, for per-image faithfulness tables
    _correlations: dict[str, ClassCorrelation] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def images(self) -> int:
        return int(self.sums["images"])

    @property
    def decode_errors(self) -> int:
        return int(self.sums["decode_errors"])

    @property
    def images_per_s(self) -> float | None:
        return self.images_this_session / self.seconds if self.seconds > 0 and self.images_this_session else None

    @property
    def images_per_s_overall(self) -> float | None:
        """All images (and undecodable files) over all sessions' loop time."""
        n = self.images + self.decode_errors
        return n / self.seconds_total if self.seconds_total > 0 and n else None

    def top1(self, key: str) -> float:
        return int(self.sums[f"{key}.correct"]) / self.images if self.images else float("nan")

    def group_top1(self, key: str) -> np.ndarray | None:
        c = self.sums.get(f"{key}.group_correct")
        return None if c is None else c / max(self.images, 1)

    def present_classes(self) -> np.ndarray:
        return np.flatnonzero(self.sums["class_images"] > 0)

    def gated(self) -> list[str]:
        """Keys of the models whose gates were summed (SA, SE, ECA), in model order."""
        return [k for k, m in self.models.items() if m.get("gates")]

    def class_gate_means(self, key: str) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
        """(classes (K,), depth -> branch -> (K, width) mean gates) over classes with images, in
        the model's own unit (SA: per group; SE, ECA: per channel)."""
        gates = self.models[key]["gates"]
        classes = self.present_classes()
        counts = self.sums["class_images"][classes].astype(np.float64)[:, None]
        return classes, {d: {b: self.sums[gate_sum_key(key, d, b)][classes] / counts for b in gates["branches"]}
                         for d in gates["depths"]}

    def class_profiles(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(classes (K,), channel means (D, K, W), spatial means (D, K, W) or None without a
        spatial branch) over classes with images. SA: W = its groups at every depth; SE, ECA: W is
        the widest depth's channels, NaN beyond each depth's own (``models[key]["gates"]["widths"]``)."""
        classes, means = self.class_gate_means(key)
        gates = self.models[key]["gates"]
        stacked = {}
        for branch in gates["branches"]:
            out = np.full((len(gates["depths"]), len(classes), max(gates["widths"])), np.nan)
            for i, d in enumerate(gates["depths"]):
                out[i, :, : means[d][branch].shape[1]] = means[d][branch]
            stacked[branch] = out
        return classes, stacked["channel"], stacked.get("spatial")

    def class_correlation(self, key: str) -> ClassCorrelation:
        """Per depth: Pearson correlation of the classes' mean profiles (every branch the model's
        gates have, one after another: SA's [channel, spatial], SE's and ECA's channel gates)."""
        if key not in self._correlations:
            classes, means = self.class_gate_means(key)
            gates = self.models[key]["gates"]
            flat = {d: np.concatenate([means[d][b] for b in gates["branches"]], axis=1) for d in gates["depths"]}
            hint = CONSTANT_HINTS.get(gates["kind"], "untrained gates?")
            self._correlations[key] = correlation_of_means(gates["depths"], [int(c) for c in classes], flat,
                                                           constant_hint=hint)
        return self._correlations[key]

    def correlation_across_models(self) -> dict[str, Any]:
        """Every gated model's mean between-class correlation on one axis of depth (stage_block
        2_1 ... 5_3, :func:`depth_position`), null where a model has no module or it is undefined."""
        corrs = {k: self.class_correlation(k) for k in self.gated()}
        positions = sorted({depth_position(d) for c in corrs.values() for d in c.depths},
                           key=lambda p: tuple(int(v) for v in p.split("_")))
        models = {}
        for k, corr in corrs.items():
            at = {depth_position(d): corr.mean_between[d] for d in corr.depths}
            models[k] = {"display_name": self.models[k]["display_name"], "kind": self.models[k]["gates"]["kind"],
                         "pretrained": self.models[k]["pretrained"],
                         "mean_between_class_correlation": [_clean(at[p]) if p in at else None for p in positions]}
        return {"positions": positions, "classes": len(self.present_classes()),
                "reading": "the paper: high at early depths (gates shared between classes), falling with depth "
                           "(class-specific); untrained models' numbers are no finding",
                "models": models}

    def identical_depths(self, key: str) -> list[str]:
        """Depths where every class's mean profile is the same (up to rounding): the gates do not
        depend on the image there, and a correlation of 1 between classes is no finding."""
        _, means = self.class_gate_means(key)
        out = []
        for d, v in means.items():
            flat = np.concatenate(list(v.values()), axis=1)
            if len(flat) >= 2 and float(np.abs(flat - flat.mean(0)).max()) < CONSTANT_STD:
                out.append(d)
        return out

    def profile_spread(self, key: str) -> dict[str, float]:
        """Per depth, the standard deviation of all classes' mean profiles together: 0 when the gates
        are constant (untrained SA layers: weight 0, bias 1), where correlations mean nothing."""
        _, means = self.class_gate_means(key)
        return {d: float(np.concatenate(list(v.values()), axis=1).std()) for d, v in means.items()}

    def label(self, index: int) -> str:
        return self.categories[index] if 0 <= index < len(self.categories) else str(index)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.images, "decode_errors": self.decode_errors,
            "decode_error_examples": self.decode_error_examples,
            "classes": len(self.present_classes()),
            "device": self.device, "world_size": self.world_size, "probe_precision": self.precision,
            "throughput": {"images_per_s": self.images_per_s, "seconds": round(self.seconds, 3),
                           "images_per_s_all_sessions": self.images_per_s_overall,
                           "seconds_all_sessions": round(self.seconds_total, 3),
                           "images_this_session": self.images_this_session,
                           "images_resumed": self.images_resumed},
            "pretrained": all(m["pretrained"] for m in self.models.values()),
            "models": {},
        }
        for key, m in self.models.items():
            entry: dict[str, Any] = {
                "display_name": m["display_name"], "pretrained": m["pretrained"], "weights": m["weights"],
                "top1": self.top1(key), "correct": int(self.sums[f"{key}.correct"]),
                "mean_unmasked_score": float(self.sums[f"{key}.unmasked_score"]) / max(self.images, 1),
                "probe_precision": m.get("probe_precision", self.precision), "bf16_check": m.get("bf16_check"),
            }
            group = self.group_top1(key)
            if group is not None:
                score = self.sums[f"{key}.group_score"] / max(self.images, 1)
                entry["group_probe"] = {
                    "layer": m["probe_layer"], "paper_name": m["probe_paper_name"], "groups": len(group),
                    "semantics": "share of images whose argmax(model(x * a_k)) equals the label",
                    "top1_per_group": group.tolist(),
                    "correct_per_group": self.sums[f"{key}.group_correct"].astype(int).tolist(),
                    "mean_top1_over_groups": float(group.mean()),
                    "best_group": int(group.argmax()), "worst_group": int(group.argmin()),
                    "mean_score_per_group": score.tolist(),
                }
            if m.get("gates"):
                gates = m["gates"]
                if gates["kind"] != "SA":  # SA's entry keeps its keys (sa_depths below)
                    entry["gates"] = {k: gates[k] for k in ("kind", "title", "unit", "branches", "depths",
                                                            "widths", "modules")}
                if len(self.present_classes()) >= 2:
                    corr = self.class_correlation(key)
                    entry["mean_between_class_correlation"] = {
                        d: None if np.isnan(v) else v for d, v in corr.mean_between.items()}
                    entry["correlation_undefined"] = corr.notes
                else:
                    entry["mean_between_class_correlation"] = None
                if gates["kind"] == "SA":
                    entry["sa_depths"] = m["sa_depths"]
                # How much the class profiles vary at all: gates of untrained SA layers (weight 0,
                # bias 1) are constant, and correlations of rounding noise mean nothing.
                spread = self.profile_spread(key)
                entry["profile_std_per_depth"] = spread
                flat = [d for d, v in spread.items() if v < 1e-6]
                if flat:
                    entry["note"] = (f"SA gates are constant at {', '.join(flat)} (untrained SA layers?): the "
                                     "class correlations there measure rounding noise only" if gates["kind"] == "SA"
                                     else f"{gates['kind']} gates are constant at {', '.join(flat)} (untrained?): "
                                     "the class correlations there are undefined")
                same = [d for d in self.identical_depths(key) if d not in flat] if gates["kind"] != "SA" else []
                if same:
                    entry["note"] = ((entry["note"] + "; ") if "note" in entry else "") + (
                        f"every class has the same {gates['kind']} profile at {', '.join(same)} (untrained? timm "
                        "zero-initialises each block's last BatchNorm, so the gates do not depend on the image): "
                        "r = 1 there says nothing")
            out["models"][key] = entry
        gated = self.gated()
        if len(gated) >= 2 and len(self.present_classes()) >= 2:
            out["correlation_across_models"] = self.correlation_across_models()
        if self.faithfulness is not None and faith.MEASURED in self.sums:
            out["faithfulness"] = faith.summary(self.sums, self.models, self.faithfulness)
        untrained = [m["display_name"] for m in self.models.values() if not m["pretrained"]]
        out["warning"] = untrained_warning(untrained, subject="these numbers") if untrained else None
        return out


def _clean(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["name"] = name
        info["threads"] = torch.get_num_threads()
        info["cpus"] = os.cpu_count()
    return info

