"""Does ``auto`` precision choose the same way twice? Runs its check several times on the same
weights, each time on fresh copies of the models, optionally while other processes load the CPU.

    python benchmarks/precision_stability.py [--runs 3] [--load 2] [--device auto] [--weights calibrated]

Per run and model: the check's verdict (fp32, mixed or bf16), the accuracy numbers and the speed
ratios it rests on (best of 3 batches in turns, ``probes.best_interleaved_ms``), and whether the
log line says a ratio is close to the 0.9 margin. ``--load N`` starts N busy processes for the
duration (bounded: they stop with the script). A device without native bf16 has no check (auto is
fp32): the script says so. Issue 19's question: three runs, the same choice, or the log says why not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_analysis import load_lab, machine_line

from sanet_viz.analysis import AnalysisOptions, explain, probe_model
from sanet_viz.lab import resolve_precision

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "chelsea.jpg"


def _busy(stop_at: float) -> None:
    """One core's worth of load until ``stop_at`` (monotonic seconds), then exit."""
    x = 0
    while time.monotonic() < stop_at:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--load", type=int, default=0, help="busy processes beside the checks")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="calibrated", help="untrained, calibrated, or a weights folder")
    p.add_argument("--max-seconds", type=float, default=600, help="the load processes stop after this")
    args = p.parse_args()

    workers = [mp.Process(target=_busy, args=(time.monotonic() + args.max_seconds,), daemon=True)
               for _ in range(args.load)]
    for w in workers:
        w.start()
    verdicts: dict[str, list[str]] = {}
    try:
        for run in range(args.runs):
            lab = load_lab(args.weights, device=args.device)  # fresh models: no earlier check, no copies
            if resolve_precision("auto", lab.device) == "fp32":
                print(f"{lab.device}: no native bf16, so auto is fp32 without a check; nothing to compare")
                return 0
            image = lab.prepare(IMAGE)
            options = AnalysisOptions(precision="auto", gates=False)
            result = explain(lab, image, options, name=IMAGE.name)
            for key, lm in lab.models.items():
                with lm.lock:
                    probe_model(lm, image, result.models[key], options, name=IMAGE.name)
                check = lm.bf16_check
                verdicts.setdefault(lm.display_name, []).append(check.verdict if check else "fp32")
                print(f"run {run + 1}, {lm.display_name}: {check.describe() if check else 'no check'}", flush=True)
    finally:
        for w in workers:
            w.terminate()
    print(f"\nmachine: {machine_line(lab.device)}; load: {args.load} busy processes; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, choices in verdicts.items():
        same = len(set(choices)) == 1
        print(f"{name}: {', '.join(choices)}: {'the same every run' if same else 'NOT the same'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
