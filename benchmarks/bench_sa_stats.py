"""SA's per-(sample, channel) statistics on the CPU: torch.var_mean vs models.instance_stats.

    python benchmarks/bench_sa_stats.py [--batch 16] [--repeats 7]

One row per SANet50 stage shape and dtype, channels_last as the inference copy runs them;
median milliseconds per call. Why models.instance_stats does not call var_mean on the CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sanet_viz.models import instance_stats

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # SANet50's SA inputs at 224x224


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, batch {args.batch}\n")
    print("| dtype | C x H x W | var_mean ms | instance_stats ms | speed-up |\n|---|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for channels, size in STAGES:
            x = torch.randn(args.batch, channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            slow = median_ms(lambda x=x: torch.var_mean(x, dim=(2, 3), correction=0), args.repeats)
            fast = median_ms(lambda x=x: instance_stats(x), args.repeats)
            print(f"| {str(dtype).removeprefix('torch.')} | {channels} x {size} x {size} | {slow:.2f} | "
                  f"{fast:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
