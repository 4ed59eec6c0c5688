"""torch.distributed for ``reproduce``: joining the process group, agreeing, and reducing sums.

Every collective here is entered by every rank, in the same order. A rank that fails never
leaves the others waiting in a collective; the protocol has two calls:

- :func:`check_peers`, an agreement point that every rank passes before each block of
  collectives (restoring a checkpoint, reducing the sums): it raises :class:`PeerFailed` on the
  healthy ranks when some rank has failed.
- :func:`finish`, the last collective of a run, which every rank calls exactly once, whatever
  happened: after its outputs are written, or from wherever it failed. A failed rank calls it
  straight away; it meets the others at their next :func:`check_peers` (which sends them to
  :func:`finish` too) and waits there until every rank has arrived. It returns the worst
  outcome of all ranks, so that every rank exits with the same status.

Local work that can fail (loading, the loop over batches, writing outputs) lies only between
these points, never inside a block of collectives. A rank interrupted by a signal does not take
part (it exits at once: torchrun or the scheduler stops the others); a collective that fails
because a rank is gone raises :class:`torch.distributed.DistError`, after which no collective
is attempted.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["init_distributed", "rank_world", "PeerFailed", "check_peers", "finish", "reduce_sums", "gather_lists",
           "max_across_ranks"]


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


class PeerFailed(RuntimeError):
    """Another rank failed (it says why); this one stopped at an agreement point."""


def _collective_device() -> torch.device:
    """Where this process group's tensors must live: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(severity: int, *, final: bool) -> tuple[int, bool]:
    """One agreement all-reduce: (the highest severity, whether some rank is not at :func:`finish`)."""
    flags = torch.tensor([severity, 0 if final else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])


def check_peers() -> None:
    """An agreement point before a block of collectives: raises :class:`PeerFailed` if some rank
    has failed (and so went to :func:`finish` instead of coming here)."""
    if _distributed() and _sync(0, final=False)[0]:
        raise PeerFailed(f"rank {dist.get_rank()} stopped: another rank failed (its messages say why)")


def finish(severity: int) -> int:
    """The run's last collective, called once by every rank: its own outcome as a ``severity``
    (0 for success, higher is worse), returning the highest severity over all ranks.

    A rank that failed calls it from where it failed; it waits here, taking part in the others'
    :func:`check_peers` (which sends them here) until every rank has arrived.
    """
    if not _distributed():
        return severity
    while True:
        agreed, pending = _sync(severity, final=True)
        if not pending:
            return agreed
        if not agreed:  # every rank passes the same agreement points on the way to a success
            # A DistError: the caller attempts no further collective.
            raise dist.DistError("reproduce: a rank finished while another was at an agreement point")


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
