"""Naive pipeline vs sanet-viz's analysis, on the same machine in the same run.

naive = the official probe loop (64 sequential batch-1 masked forwards, fp32, the model as
        defined) + pytorch-grad-cam's GradCAM + the plain forward the probe starts from, per model;
ours  = analysis.analyze (one fp32 CAM pass that also yields logits, features and gates, its
        backward cut at the target layer; the masked forwards batched on an inference copy:
        shuffle folded, BN fused, SA tail fused, channels_last), in fp32, in mixed precision (bf16
        in layer3-layer4), in bf16, and in ``auto`` (what the default does once its check has run:
        bf16, mixed or fp32 per model).

    python benchmarks/bench_analysis.py [--quick] [--repeats 3] [--images examples/*.jpg]
                                        [--weights calibrated|untrained|DIR] [--compile] [--json out.json]

The machine is usually shared: every repeat runs naive and ours back to back on each image, so
each ratio is taken within one repeat; the tables give medians over repeats and images. Printed:
the machine and its load averages, the weights, per-image totals and ratios against the targets,
per-stage times in fp32 and bf16 next to naive's, the SA layer's cost per masked forward (SANet50
vs ResNet50 at the probe batch size, with the SA tail fused and not), the CLI over all images with
files written after each image or in the background, bf16 agreement, and peak memory.

Weights: ``calibrated`` (default; random weights with trained-looking statistics, see
benchmarks/calibrated.py), ``untrained``, or a folder holding both models' weights files.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import CALIBRATED_SOURCE, calibrate, example_batch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402

from sanet_viz import models  # noqa: E402
from sanet_viz.analysis import AnalysisOptions, analyze  # noqa: E402
from sanet_viz.export import BackgroundWriter, write_result  # noqa: E402
from sanet_viz.hooks import resolve_module  # noqa: E402
from sanet_viz.lab import Lab, check_compiler, fuse_sa_tail, resolve_precision  # noqa: E402
from sanet_viz.preprocessing import PreparedImage, load_and_prepare  # noqa: E402
from sanet_viz.probes import spearman  # noqa: E402
from sanet_viz.weights import WeightsInfo  # noqa: E402

TARGETS = {"ours fp32": 0.75, "ours bf16": 0.35}  # issue 15: per image, against naive in the same run
SA_TARGET = 1.10  # SANet50's masked forward within 10% of ResNet50's


# ---------------------------------------------------------------------------------------------
# Weights and machine


def load_lab(weights: str, *, device: str = "auto", compile_probe: bool = False) -> Lab:
    """Both models with ``weights``: untrained, calibrated (benchmarks/calibrated.py), or a folder."""
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if weights not in {"untrained", "calibrated"}:
        return Lab.load(weights_dir=Path(weights), device=device, require_pretrained=True,
                        compile_probe=compile_probe, log=log)
    lab = Lab.load(resnet50="untrained", sanet50="untrained", device=device, compile_probe=compile_probe, log=log)
    if weights == "calibrated":
        batch = example_batch()
        for lm in lab.models.values():
            calibrate(lm.model.cpu(), batch)
            lm.model.to(lm.device).requires_grad_(False)
            lm.fast_model = models.inference_copy(lm.model, fuse_sa=fuse_sa_tail(lm.device)).to(lm.device)
            lm.weights = WeightsInfo(CALIBRATED_SOURCE, False, note="benchmark weights")
    return lab


def machine_line(device: torch.device) -> str:
    gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{platform.processor() or platform.machine()} ({_cpu_model()}), {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} threads, device {device}{gpu}, torch {torch.__version__}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_line() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"


def weights_line(lab: Lab) -> str:
    return "; ".join(f"{lm.display_name}: {lm.weights.source}" for lm in lab.models.values())


# ---------------------------------------------------------------------------------------------
# naive


def official_probe(model: torch.nn.Module, x: torch.Tensor, layer: str = "layer4.2") -> list[float]:
    """The official GroupAct loop: one forward per group, batch 1 (NaN guard added)."""
    store = {}
    handle = resolve_module(model, layer).register_forward_hook(lambda m, i, o: store.update(out=o.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    c = int(logits.argmax(-1))
    feats = store["out"]
    scores = []
    with torch.no_grad():
        for chunk in feats.chunk(64, dim=1):
            a = torch.nn.functional.interpolate(chunk.mean(1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                                                align_corners=False)
            span = a.max() - a.min()
            a = (a - a.min()) / span if span > 0 else torch.zeros_like(a)
            scores.append(float(torch.softmax(model(x * a), -1)[0, c]))
    return scores


def naive_pipeline(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    t0 = time.perf_counter()
    xg = x.clone().requires_grad_(True)
    with GradCAM(model=model, target_layers=[resolve_module(model, "layer4.2")]) as cam:
        cam(input_tensor=xg, targets=None)
    t1 = time.perf_counter()
    official_probe(model, x)
    t2 = time.perf_counter()
    for p in model.parameters():
        p.grad = None
    return {"CAM": (t1 - t0) * 1e3, "probe": (t2 - t1) * 1e3}


# ---------------------------------------------------------------------------------------------
# Measurements


class Samples:
    """Named lists of milliseconds, and ratios taken within a repeat."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}
        self.ratios: dict[str, list[float]] = {}

    def add(self, name: str, ms: float) -> None:
        self.ms.setdefault(name, []).append(ms)

    def ratio(self, name: str, value: float) -> None:
        self.ratios.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.ms[name]) if name in self.ms else float("nan")


def run_pipelines(lab: Lab, images: list[PreparedImage], precisions: list[str], args: argparse.Namespace,
                  out: Samples) -> dict[str, list[np.ndarray]]:
    """Per repeat and image: naive, then ours in each precision; returns probe scores per
    (precision, model) from the first repeat."""
    device = lab.device
    probes: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n, image in enumerate(images):
                naive = None if args.skip_naive else _naive_once(lab, image, out)
                for precision in precisions:
                    options = AnalysisOptions(precision=precision, probe_batch_size=args.batch_size)
                    _sync(device)
                    t = time.perf_counter()
                    result = analyze(lab, image, options)
                    _sync(device)
                    ms = (time.perf_counter() - t) * 1e3
                    out.add(f"ours {precision}", ms)
                    if naive:
                        out.ratio(f"ours {precision}", ms / naive)
                    out.add(f"{precision} first heatmaps", result.timings_ms["explain"])
                    for key, m in result.models.items():
                        for stage, value in m.timings_ms.items():
                            out.add(f"{precision} {lab.models[key].display_name} {_stage_name(stage)}", value)
                        if m.probe is not None and repeat == 0 and precision in {"fp32", "bf16"}:
                            probes.setdefault(f"{precision} {key}", []).append(m.probe.scores.numpy())
                    if precision == "fp32":
                        t = time.perf_counter()
                        write_result(result, Path(tmp) / f"{n}-{repeat}")
                        out.add("fp32 files (write_result: charts, CAMs, result.json)", (time.perf_counter() - t) * 1e3)
    return probes


def _stage_name(stage: str) -> str:
    return {"cam": "CAM pass", "probe": "probe"}.get(stage, stage)


def _naive_once(lab: Lab, image: PreparedImage, out: Samples) -> float:
    x = image.tensor.to(lab.device)
    total = 0.0
    for lm in lab.models.values():
        with lm.lock:
            _sync(lab.device)
            part = naive_pipeline(lm.model, x)
            _sync(lab.device)
        for stage, ms in part.items():
            out.add(f"naive {lm.display_name} {stage}", ms)
        total += sum(part.values())
    out.add("naive fp32", total)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sa_cost(lab: Lab, *, batch_size: int, repeats: int, out: Samples, compile_sa: bool) -> None:
    """Masked forwards of random inputs at the probe batch size: ResNet50 vs SANet50 with the SA
    tail fused (the default inference copy) and not, interleaved per repeat, fp32 and bf16.
    ``compile_sa``: also SANet50 with only its 16 SA tails compiled by inductor (a candidate)."""
    device = lab.device
    base = {"ResNet50": lab.models["resnet50"].model, "SANet50": lab.models["sanet50"].model}
    fp32 = {"ResNet50": models.inference_copy(base["ResNet50"]),
            "SANet50": models.inference_copy(base["SANet50"]),
            "SANet50 unfused SA": models.inference_copy(base["SANet50"], fuse_sa=False)}
    if compile_sa:
        fp32["SANet50 SA tails compiled"] = fp32["SANet50"]  # compiled per dtype below
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if resolve_precision("auto", device) == "bf16"
                                        else {})
    with torch.no_grad():
        for label, dtype in dtypes.items():
            nets = {name: copy.deepcopy(net).to(device=device, dtype=dtype) for name, net in fp32.items()}
            if compile_sa:
                _compile_sa_tails(nets["SANet50 SA tails compiled"])
            xd = x.to(dtype)
            for name, net in nets.items():
                out.add(f"first call {label} {name}", _timed(lambda net=net, xd=xd: net(xd), device))
            for _ in range(repeats):
                times = {name: _timed(lambda net=net, xd=xd: net(xd), device) / batch_size
                         for name, net in nets.items()}
                for name, ms in times.items():
                    out.add(f"SA {label} {name}", ms)
                    out.ratio(f"SA {label} {name}", ms / times["ResNet50"])


def _compile_sa_tails(net: torch.nn.Module) -> None:
    """Only the SA tails through inductor (the plain expression it fuses); the rest stays eager."""
    compiled = torch.compile(models.FoldedShuffleAttention.gate_residual_relu_, dynamic=False)
    for block in net.modules():
        if isinstance(block, models.InferenceSABottleneck):
            block.sa.gate_residual_relu_ = functools.partial(compiled, block.sa)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def run_cli_pipeline(lab: Lab, images: list[PreparedImage], *, batch_size: int, repeats: int, out: Samples) -> None:
    """The CLI's loop over all images (fp32): files written after each image, or by the
    BackgroundWriter while the next image is analysed (what ``analyze`` does)."""
    options = AnalysisOptions(precision="fp32", probe_batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            t = time.perf_counter()
            for n, image in enumerate(images):
                write_result(analyze(lab, image, options), Path(tmp) / f"seq-{repeat}-{n}")
            sequential = (time.perf_counter() - t) * 1e3 / len(images)
            t = time.perf_counter()
            with BackgroundWriter() as writer:
                for n, image in enumerate(images):
                    writer.submit(analyze(lab, image, options), Path(tmp) / f"bg-{repeat}-{n}")
            background = (time.perf_counter() - t) * 1e3 / len(images)
            out.add("files written after each image", sequential)
            out.add("files written in the background", background)
            out.ratio("files written in the background", background / sequential)


# ---------------------------------------------------------------------------------------------
# Report


def print_report(lab: Lab, out: Samples, probes: dict[str, list[np.ndarray]], args: argparse.Namespace,
                 precisions: list[str], header: list[str]) -> dict[str, object]:
    print("\n".join(header))
    for lm in lab.models.values():
        if lm.bf16_check is not None:
            print(f"auto: {lm.display_name}: {lm.bf16_check.describe()}")
    print("\n| pipeline | ms / image (median) | vs naive (median of per-repeat ratios) | target |")
    print("|---|---:|---:|---|")
    for name in ["naive fp32"] + [f"ours {p}" for p in precisions]:
        ratio = statistics.median(out.ratios[name]) if name in out.ratios else None
        target = TARGETS.get(name)
        verdict = "" if target is None or ratio is None else f"<= {target}: {'met' if ratio <= target else 'NOT met'}"
        print(f"| {name} | {out.median(name):.0f} | {'1.000' if name == 'naive fp32' else _fmt(ratio)} | "
              f"{verdict} |")
    _print_stages(lab, out, precisions)
    _print_sa_cost(out, args.batch_size)
    _print_cli(out)
    if probes.get("bf16 sanet50"):
        print("\nbf16 vs fp32 probe scores (per image): max |diff|, Spearman of the 64-group ranking")
        for key in lab.models:
            for a, b in zip(probes[f"fp32 {key}"], probes[f"bf16 {key}"], strict=True):
                print(f"  {key}: {np.abs(a - b).max():.4f}, {spearman(torch.from_numpy(a), torch.from_numpy(b)):.3f}")
    medians = {k: statistics.median(v) for k, v in out.ms.items()}
    pipelines = {f"ours {p}" for p in precisions} | {"naive fp32"}
    # gpu_check.py reads this: whole pipelines under median_ms, everything else under stages_ms.
    return {"median_ms": {k: v for k, v in medians.items() if k in pipelines},
            "stages_ms": {k: v for k, v in medians.items() if k not in pipelines},
            "median_ratio": {k: statistics.median(v) for k, v in out.ratios.items()},
            "device": str(lab.device),
            "pretrained": {k: lm.weights.pretrained for k, lm in lab.models.items()},
            "precision_checks": {k: lm.bf16_check.to_dict() if lm.bf16_check else None
                                 for k, lm in lab.models.items()}}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_stages(lab: Lab, out: Samples, precisions: list[str]) -> None:
    shown = [p for p in ("fp32", "mixed", "bf16") if p in precisions]
    print(f"\n| stage, ms (median) | naive | {' | '.join('ours ' + p for p in shown)} |")
    print("|---|---:|" + "---:|" * len(shown))
    for lm in lab.models.values():
        for stage, naive in (("CAM pass", "CAM"), ("probe", "probe")):
            cells = [f"{out.median(f'{p} {lm.display_name} {stage}'):.0f}" for p in shown]
            print(f"| {lm.display_name} {stage} | {out.median(f'naive {lm.display_name} {naive}'):.0f} | "
                  + " | ".join(cells) + " |")
    cells = [f"{out.median(f'{p} first heatmaps'):.0f}" for p in shown]
    print("| first heatmaps (the app's first step: both CAM passes) | - | " + " | ".join(cells) + " |")
    files = "fp32 files (write_result: charts, CAMs, result.json)"
    print(f"| pictures and files per image | - | {out.median(files):.0f} |" + " |" * (len(shown) - 1))


def _print_sa_cost(out: Samples, batch_size: int) -> None:
    rows = [k for k in out.ms if k.startswith("SA ")]
    first = [k for k in out.ms if k.startswith("first call ") and "compiled" in k]
    if not rows:
        return
    print(f"\nSA cost per masked forward (random inputs, batch {batch_size}): ms/image, and vs ResNet50 "
          f"(median of per-repeat ratios; target <= {SA_TARGET})")
    print("| precision, model | ms / image | vs ResNet50 |\n|---|---:|---:|")
    for name in rows:
        print(f"| {name.removeprefix('SA ')} | {out.median(name):.1f} | {statistics.median(out.ratios[name]):.3f} |")
    for name in first:
        print(f"{name} (compiling): {out.median(name) / 1e3:.1f} s")


def _print_cli(out: Samples) -> None:
    name = "files written in the background"
    if name not in out.ms:
        return
    print("\nCLI loop over the images (analyse fp32 + write every file), ms / image")
    print(f"| files | ms / image | vs after each image |\n|---|---:|---:|\n"
          f"| written after each image | {out.median('files written after each image'):.0f} | 1.000 |\n"
          f"| written in the background (BackgroundWriter) | {out.median(name):.0f} | "
          f"{statistics.median(out.ratios[name]):.3f} |")



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=Path, default=sorted((ROOT / "examples").glob("*.jpg")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one image, one repeat (a smoke run, not a measurement)")
    parser.add_argument("--weights", default="calibrated", help="calibrated (default), untrained, or a folder with "
                        "both models' weights files")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "mixed", "bf16", "auto"], help="default: all the "
                        "device runs natively")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-sa-cost", action="store_true")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--compile-sa", action="store_true", help="also time SANet50 with only its SA tails "
                        "torch.compiled (needs a C++ compiler on the CPU)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's). One thread gives "
                        "steadier ratios on a loaded machine: an operation never waits for a descheduled thread")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--compile", action="store_true", help="torch.compile the masked-forward models")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = args.images[:1], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args()
    start_load = load_line()
    lab = load_lab(args.weights, device=args.device, compile_probe=args.compile)
    if args.compile_sa:
        check_compiler(lab.device)  # fail before the long runs
    images = [load_and_prepare(p) for p in args.images]
    native = ["fp32"] + (["mixed", "bf16", "auto"] if resolve_precision("auto", lab.device) == "bf16" else [])
    precisions = args.precisions or native
    warmups = {}
    for precision in precisions:  # first calls (bf16 copy, compile, auto's check) before any timing
        t = time.perf_counter()
        analyze(lab, images[0], AnalysisOptions(precision=precision, probe_batch_size=args.batch_size),
                name=args.images[0].name)
        warmups[precision] = time.perf_counter() - t
    peak_ours_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before naive runs
    out = Samples()
    probes = run_pipelines(lab, images, precisions, args, out)
    if not args.skip_sa_cost:
        run_sa_cost(lab, batch_size=args.batch_size, repeats=max(3, 2 * args.repeats), out=out,
                    compile_sa=args.compile_sa)
    if not args.skip_cli:
        run_cli_pipeline(lab, images, batch_size=args.batch_size, repeats=args.repeats, out=out)
    header = [f"\nmachine: {machine_line(lab.device)}",
              f"{start_load} at the start, {load_line()} at the end",
              f"weights: {weights_line(lab)}",
              f"{len(images)} images x {args.repeats} repeats, both models, every output (CAM, top-5, probes, "
              f"gates); probe batch {args.batch_size}" + (", masked forwards torch.compiled" if args.compile else ""),
              "first call per precision (s): " + ", ".join(f"{k} {v:.1f}" for k, v in warmups.items()),
              f"peak resident memory after ours' first calls: {peak_ours_mb:.0f} MB"]
    numbers = print_report(lab, out, probes, args, precisions, header)
    if args.json:
        peak_gpu_mb = torch.cuda.max_memory_allocated(lab.device) / 2**20 if lab.device.type == "cuda" else None
        args.json.write_text(json.dumps({**numbers, "peak_rss_mb": peak_ours_mb, "peak_gpu_mb": peak_gpu_mb,
                                         "header": header}, indent=2))


if __name__ == "__main__":
    main()
