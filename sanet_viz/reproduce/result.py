"""A data-set run's outcome: every rank's sums and counts, and the figures derived from them."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..correlation import ClassCorrelation, correlation_of_means
from ..weights import untrained_warning
from . import faithfulness as faith

__all__ = ["ReproduceResult", "device_info"]


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

    def class_profiles(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classes (K,), channel means (D, K, G), spatial means (D, K, G)) over classes with images."""
        classes = self.present_classes()
        counts = self.sums["class_images"][classes].astype(np.float64)
        channel = self.sums[f"{key}.gate_channel"][:, classes] / counts[None, :, None]
        spatial = self.sums[f"{key}.gate_spatial"][:, classes] / counts[None, :, None]
        return classes, channel, spatial

    def class_correlation(self, key: str) -> ClassCorrelation:
        """Per depth: Pearson correlation of the classes' mean [channel, spatial] profiles."""
        classes, channel, spatial = self.class_profiles(key)
        depths = self.models[key]["sa_depths"]
        means = {depth: np.concatenate([channel[d], spatial[d]], axis=1) for d, depth in enumerate(depths)}
        return correlation_of_means(depths, [int(c) for c in classes], means)

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
            if m["sa_depths"]:
                if len(self.present_classes()) >= 2:
                    corr = self.class_correlation(key)
                    entry["mean_between_class_correlation"] = {
                        d: None if np.isnan(v) else v for d, v in corr.mean_between.items()}
                    entry["correlation_undefined"] = corr.notes
                else:
                    entry["mean_between_class_correlation"] = None
                entry["sa_depths"] = m["sa_depths"]
                # How much the class profiles vary at all: gates of untrained SA layers (weight 0,
                # bias 1) are constant, and correlations of rounding noise mean nothing.
                _, channel, spatial = self.class_profiles(key)
                spread = {d: float(np.concatenate([channel[i], spatial[i]], axis=1).std())
                          for i, d in enumerate(m["sa_depths"])}
                entry["profile_std_per_depth"] = spread
                flat = [d for d, v in spread.items() if v < 1e-6]
                if flat:
                    entry["note"] = (f"SA gates are constant at {', '.join(flat)} (untrained SA layers?): the "
                                     "class correlations there measure rounding noise only")
            out["models"][key] = entry
        if self.faithfulness is not None and faith.MEASURED in self.sums:
            out["faithfulness"] = faith.summary(self.sums, self.models, self.faithfulness)
        untrained = [m["display_name"] for m in self.models.values() if not m["pretrained"]]
        out["warning"] = untrained_warning(untrained, subject="these numbers") if untrained else None
        return out


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

