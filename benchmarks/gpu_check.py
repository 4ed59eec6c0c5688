"""Measurements and table of ``benchmarks/gpu_check.sh`` (run that; this part needs a CUDA GPU).

Runs ``benchmarks/bench_analysis.py --device cuda`` (fp32, bf16 and auto; per stage; peak GPU
memory), generates an ImageFolder of random JPEGs and runs ``python -m sanet_viz reproduce`` on it
in fp32 and in bf16 (images per second from summary.json; peak GPU memory), then prints one table
against the targets and exits 1 if a target or the gpu tests failed.

    python benchmarks/gpu_check.py [--images 512] [--repeats 5] [--work DIR] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TARGET_ANALYSIS_MS = 60.0  # a whole analysis of one image, both models, on an H100-class GPU
TARGET_REPRODUCE_IMAGES_PER_S = 25.0

# `reproduce` in a child process that reports torch's peak GPU memory after the run.
REPRODUCE_WITH_PEAK = ("import sys, torch\nfrom sanet_viz.cli import main\nstatus = main(sys.argv[1:])\n"
                       "print(f'peak_gpu_mb {torch.cuda.max_memory_allocated() / 2**20:.0f}', flush=True)\n"
                       "sys.exit(status)")


@dataclass
class Row:
    check: str
    measured: str
    target: str = ""
    passed: bool | None = None  # None: for information

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("pass" if self.passed else "FAIL")


def make_folder(root: Path, images: int, classes: int = 10, seed: int = 0) -> Path:
    """``images`` random JPEGs of 256 to 512 pixels a side, in class folders ``0`` .. ``classes-1``."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / str(i % classes)
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(256, 513, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)
    return root


def run_bench(work: Path, repeats: int, timeout: float) -> dict[str, Any]:
    out = work / "bench_analysis.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_analysis.py"), "--device", "cuda", "--skip-naive",
           "--repeats", str(repeats), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (work / "bench_analysis.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_analysis.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def run_reproduce(data: Path, out: Path, precision: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-c", REPRODUCE_WITH_PEAK, "reproduce", "--data", str(data), "--out", str(out),
           "--precision", precision, "--device", "cuda", "--fresh", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    (out.parent / f"reproduce_{precision}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"reproduce --precision {precision} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    peak = re.search(r"peak_gpu_mb (\d+)", proc.stdout)
    return {"images_per_s": summary["throughput"]["images_per_s"], "images": summary["images"],
            "wall_s": wall, "peak_gpu_mb": int(peak.group(1)) if peak else None,
            "precision": summary.get("precision"), "pretrained": summary.get("pretrained")}


def analysis_rows(bench: dict[str, Any]) -> list[Row]:
    medians = bench["median_ms"]
    judged = "ours auto" if "ours auto" in medians else "ours fp32"
    rows = []
    for name, ms in medians.items():
        meets = ms <= TARGET_ANALYSIS_MS
        rows.append(Row(f"analysis, one image, both models ({name.removeprefix('ours ')})", f"{ms:.1f} ms",
                        f"<= {TARGET_ANALYSIS_MS:.0f} ms" + (" (the app's default)" if name == judged else ""),
                        meets if name == judged else None))
    for name, ms in bench["stages_ms"].items():
        rows.append(Row(f"  stage: {name.removeprefix('ours ')}", f"{ms:.1f} ms"))
    if bench.get("peak_gpu_mb") is not None:
        rows.append(Row("peak GPU memory, analysis", f"{bench['peak_gpu_mb']:.0f} MB"))
    for key, check in (bench.get("precision_checks") or {}).items():
        if check:
            rows.append(Row(f"  auto: {key} bf16 check", f"max |diff| {check['max_abs_diff']}, Spearman "
                            f"{check['spearman']}: {check['verdict']}"))
    return rows


def tests_row(status: int | None, log: Path | None) -> Row:
    summary = ""
    if log is not None and log.is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", ln)]
        summary = lines[-1].strip("= ") if lines else ""
    if status is None:
        return Row("tests marked gpu", "not run")
    return Row("tests marked gpu", summary or f"pytest exit status {status}", "all pass", status == 0)


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}\n")
    print("| check | measured | target | verdict |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row.check} | {row.measured} | {row.target} | {row.verdict} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="generated pictures for reproduce")
    p.add_argument("--repeats", type=int, default=5, help="of the analysis benchmark over the examples")
    p.add_argument("--work", type=Path, help="folder for the data, outputs and logs (default: a new temp folder)")
    p.add_argument("--tests-status", type=int, help="exit status of the gpu tests (gpu_check.sh passes it)")
    p.add_argument("--tests-log", type=Path)
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: nothing to check.")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="sanet-viz-gpu-check-"))
    rows = [tests_row(args.tests_status, args.tests_log)]
    bench = run_bench(work, args.repeats, timeout=150)
    rows += analysis_rows(bench)
    data = make_folder(work / "data", args.images)
    pretrained = bench.get("pretrained", {})
    for precision in ("fp32", "bf16"):
        r = run_reproduce(data, work / f"reproduce_{precision}", precision, timeout=150)
        rows.append(Row(f"reproduce, {r['images']} images, probe in {precision}", f"{r['images_per_s']:.1f} images/s",
                        f">= {TARGET_REPRODUCE_IMAGES_PER_S:.0f} images/s",
                        r["images_per_s"] >= TARGET_REPRODUCE_IMAGES_PER_S))
        if r["peak_gpu_mb"] is not None:
            rows.append(Row(f"peak GPU memory, reproduce {precision}", f"{r['peak_gpu_mb']} MB"))
    weights = ", ".join(f"{k} {'pretrained' if v else 'UNTRAINED'}" for k, v in pretrained.items())
    header = (f"GPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
              f"weights: {weights or 'unknown'}; load average {os.getloadavg()[0]:.1f}")
    print_table(rows, header)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": [row.__dict__ for row in rows]}, indent=1))
    failed = [row.check for row in rows if row.passed is False]
    print(f"\n{'every check passed' if not failed else 'failed: ' + '; '.join(failed)} (logs in {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
