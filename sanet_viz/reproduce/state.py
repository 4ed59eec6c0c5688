"""Resumable runs: each rank's partial sums saved atomically under OUT/state, and a fingerprint
that tells whether a saved state belongs to this run (same data, models, precision, world size)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import Sample

__all__ = ["STATE_VERSION", "ReproduceStateError", "Progress", "fingerprint", "state_path", "save_state",
           "load_state"]

# 2: gate sums per depth and branch for every gated model (SA, SE, ECA), each model's preprocessing
# in the fingerprint. States of version 1 (SA gates stacked over depths) are refused, not converted.
STATE_VERSION = 2


class ReproduceStateError(ValueError):
    """A saved state that does not belong to this run."""


@dataclass
class Progress:
    """One rank's running totals: what a saved state holds."""

    sums: dict[str, Tensor]
    done: int = 0  # samples of this rank's shard already counted (decoded or not)
    errors: list[str] = field(default_factory=list)  # examples of undecodable files
    earlier_seconds: float = 0.0  # loop time of earlier sessions


def fingerprint(samples: Sequence[Sample], meta: Mapping[str, Any]) -> str:
    """sha256 of the sample list and of ``meta`` (models, precision, world size ...)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\0{s.label}\n".encode())
    h.update(json.dumps({"version": STATE_VERSION, **meta}, sort_keys=True).encode())
    return h.hexdigest()


def state_path(state_dir: Path, rank: int, world: int) -> Path:
    return state_dir / f"rank{rank:04d}-of-{world:04d}.pt"


def save_state(path: Path, fingerprint: str, progress: Progress, seconds: float) -> None:
    """Atomically: write a temporary file beside the target, then rename it over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"version": STATE_VERSION, "fingerprint": fingerprint, "done": progress.done, "seconds": seconds,
                "sums": {k: v.detach().cpu() for k, v in progress.sums.items()}, "errors": progress.errors}, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReproduceStateError(f"{path}: unreadable saved state ({exc}); rerun with --fresh") from exc


def restore(path: Path, expected: str, progress: Progress) -> str:
    """Continue ``progress`` from the state at ``path`` if it is this run's; returns a problem ("" if none)."""
    try:
        state = load_state(path)
    except ReproduceStateError as exc:
        return str(exc)
    version = state.get("version") if isinstance(state, dict) else None
    if version != STATE_VERSION:
        return (f"{path}: the saved state was written by another version of sanet-viz (state format {version}, "
                f"this one reads {STATE_VERSION}) and cannot be continued; rerun with --fresh or another --out")
    sums = state.get("sums")
    if state.get("fingerprint") != expected or not isinstance(sums, dict) or set(sums) != set(progress.sums) \
            or any(sums[k].shape != v.shape for k, v in progress.sums.items()):
        return (f"{path}: the saved state is from another run (data, --limit, models, precision or number "
                "of processes differ); rerun with --fresh or another --out")
    device = next(iter(progress.sums.values())).device
    progress.sums = {k: sums[k].to(device) for k in progress.sums}
    progress.done = int(state["done"])
    progress.earlier_seconds = float(state.get("seconds", 0.0))
    progress.errors = list(state["errors"])
    return ""
