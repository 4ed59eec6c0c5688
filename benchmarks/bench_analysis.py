"""Naive pipeline vs sanet-viz's analysis, on the same machine in the same run.

naive = the official probe loop (64 sequential batch-1 masked forwards, fp32, the model as
        defined) + pytorch-grad-cam's GradCAM + the plain forward the probe starts from, per model;
ours  = analysis.analyze (one fp32 CAM pass that also yields logits, features and gates, its
        backward cut at the target layer; the masked forwards batched on an inference copy:
        shuffle folded, BN fused, channels_last), in fp32, in bf16, and in ``auto`` (what the
        default does once its bf16 check has run: bf16 or fp32 per model).

    python benchmarks/bench_analysis.py [--images examples/*.jpg] [--repeats 3] [--device auto] [--compile]

Prints a table (median of --repeats per image), the bf16 vs fp32 probe agreement, peak
resident memory and the machine. Weights: whatever the app would load (untrained if none).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytorch_grad_cam import GradCAM  # noqa: E402

from sanet_viz.analysis import AnalysisOptions, analyze  # noqa: E402
from sanet_viz.hooks import resolve_module  # noqa: E402
from sanet_viz.lab import Lab, resolve_precision  # noqa: E402
from sanet_viz.preprocessing import load_and_prepare  # noqa: E402


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
    return {"cam": (t1 - t0) * 1e3, "probe": (t2 - t1) * 1e3}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=Path, default=sorted((ROOT / "examples").glob("*.jpg")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--compile", action="store_true", help="torch.compile the masked-forward models")
    args = parser.parse_args()

    lab = Lab.load(device=args.device, compile_probe=args.compile, log=lambda m: print(m, file=sys.stderr))
    device = lab.device
    images = [load_and_prepare(p) for p in args.images]
    precisions = ["fp32"] + (["bf16", "auto"] if resolve_precision("auto", device) == "bf16" else [])
    warmups: dict[str, float] = {}
    rows: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}
    probes: dict[str, list[np.ndarray]] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for precision in precisions:  # ours first: the peak memory below is then ours
        options = AnalysisOptions(precision=precision, probe_batch_size=args.batch_size)
        t = time.perf_counter()
        analyze(lab, images[0], options, name=args.images[0].name)  # warm-up (also compiles; auto: bf16 check)
        warmups[precision] = time.perf_counter() - t
        for _ in range(args.repeats):
            for image in images:
                sync()
                t = time.perf_counter()
                result = analyze(lab, image, options)
                sync()
                rows.setdefault(f"ours {precision}", []).append((time.perf_counter() - t) * 1e3)
                stages.setdefault(f"ours {precision} first heatmaps (CAM pass, both models)", []).append(
                    result.timings_ms["explain"])
                for key, m in result.models.items():
                    for stage, ms in m.timings_ms.items():
                        stages.setdefault(f"ours {precision} {key} {stage}", []).append(ms)
                    if m.probe is not None and _ == 0 and precision != "auto":
                        probes.setdefault(f"{precision} {key}", []).append(m.probe.scores.numpy())
    peak_ours_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    if not args.skip_naive:
        for _ in range(args.repeats):
            for image in images:
                x = image.tensor.to(device)
                total = 0.0
                for key, lm in lab.models.items():
                    with lm.lock:
                        sync()
                        part = naive_pipeline(lm.model, x)
                        sync()
                    for stage, ms in part.items():
                        stages.setdefault(f"naive {key} {stage}", []).append(ms)
                    total += sum(part.values())
                rows.setdefault("naive fp32", []).append(total)

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}; weights: "
          + ", ".join(f"{lm.display_name} {'pretrained' if lm.weights.pretrained else 'UNTRAINED'}"
                      for lm in lab.models.values()))
    print(f"{len(images)} images x {args.repeats} repeats, both models, every output (CAM, top-5, probes, gates)"
          + (", masked forwards torch.compiled" if args.compile else ""))
    print("warm-up call per precision (s): " + ", ".join(f"{k} {v:.1f}" for k, v in warmups.items()))
    for lm in lab.models.values():
        if lm.bf16_check is not None:
            print(f"auto: {lm.display_name}: {lm.bf16_check.describe()}")
    print()
    print("| pipeline | ms / image (median) | images / s | vs naive |")
    print("|---|---:|---:|---:|")
    naive = med.get("naive fp32")
    for name, ms in med.items():
        ratio = f"{ms / naive:.3f}" if naive else "-"
        print(f"| {name} | {ms:.0f} | {1e3 / ms:.2f} | {ratio} |")
    print("\n| stage | ms (median) |\n|---|---:|")
    for name, values in stages.items():
        print(f"| {name} | {statistics.median(values):.0f} |")
    if "bf16 sanet50" in probes:
        print("\nbf16 vs fp32 probe scores (per image): max |diff|, Spearman of the 64-group ranking")
        for key in ("resnet50", "sanet50"):
            for a, b in zip(probes[f"fp32 {key}"], probes[f"bf16 {key}"], strict=True):
                print(f"  {key}: {np.abs(a - b).max():.4f}, {spearman(a, b):.3f}")
    print(f"\npeak resident memory (ours): {peak_ours_mb:.0f} MB")
    if peak_gpu_mb is not None:
        print(f"peak GPU memory allocated by torch (ours): {peak_gpu_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"median_ms": med, "stages_ms": {k: statistics.median(v) for k, v in
                                                                         stages.items()},
                                         "peak_rss_mb": peak_ours_mb, "peak_gpu_mb": peak_gpu_mb,
                                         "device": str(device),
                                         "pretrained": {k: lm.weights.pretrained for k, lm in lab.models.items()},
                                         "precision_checks": {k: lm.bf16_check.to_dict() if lm.bf16_check else None
                                                              for k, lm in lab.models.items()}}, indent=2))


if __name__ == "__main__":
    main()
