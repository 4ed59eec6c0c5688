"""What the shared models look like between requests (hooks, gradients, modes) and this process's
memory: the ``/debug_stats`` route that load tests and hardening tests read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from ..lab import Lab

__all__ = ["engine_stats", "resident_mb"]


def resident_mb() -> float:
    """This process's resident memory (VmRSS) in MiB; 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def engine_stats(lab: Lab) -> dict[str, Any]:
    """Hooks, gradients and locks on the shared models, and this process's memory (debug route)."""
    def hooks(model: torch.nn.Module) -> int:
        kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_load_state_dict_pre_hooks")
        return sum(len(getattr(m, kind, {})) for m in model.modules() for kind in kinds)

    models: dict[str, Any] = {}
    for key, lm in lab.models.items():
        nets = [lm.model] + ([lm.fast_model] if lm.fast_model is not None else [])
        models[key] = {
            "hooks": sum(hooks(n) for n in nets),
            "tensor_hooks": sum(len(p._backward_hooks or {}) for n in nets for p in n.parameters()),
            "grads": sum(p.grad is not None for n in nets for p in n.parameters()),
            "requires_grad": sum(p.requires_grad for n in nets for p in n.parameters()),
            "training": sum(m.training for n in nets for m in n.modules()),
            "busy": lm.lock.locked(),
        }
    global_hooks = sum(len(getattr(torch_module, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    return {"models": models, "global_hooks": global_hooks, "rss_mb": resident_mb(),
            "threads": threading.active_count(), "torch_threads": torch.get_num_threads()}
