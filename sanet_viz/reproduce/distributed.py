"""torch.distributed for ``reproduce``: joining the process group, agreeing, and reducing sums.

Every collective here is entered by every rank, in the same order; a rank that has a problem
says so through :func:`all_agree` instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["init_distributed", "rank_world", "all_agree", "reduce_sums", "gather_lists", "max_across_ranks"]


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); returns
    (rank, world size, device for this rank). nccl on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device in {"auto", "cuda"} and torch.cuda.is_available()) or device.startswith("cuda")
    if use_cuda and device in {"auto", "cuda"}:
        device = f"cuda:{local}"
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_agree(ok: bool, device: torch.device) -> bool:
    """True on every rank when ``ok`` on every rank (so that no rank waits alone in a collective)."""
    if not _distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def reduce_sums(sums: MutableMapping[str, Tensor]) -> None:
    """Sum every tensor over the ranks, in place (in sorted key order, the same on every rank)."""
    if _distributed():
        for key in sorted(sums):
            dist.all_reduce(sums[key])


def gather_lists(items: list[str]) -> list[str]:
    """Every rank's list, concatenated in rank order."""
    if not _distributed():
        return list(items)
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def gather_objects(item: object) -> list[object]:
    """Every rank's ``item``, in rank order."""
    if not _distributed():
        return [item]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def max_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over the ranks (e.g. the slowest rank's seconds)."""
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t]
