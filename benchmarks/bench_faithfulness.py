"""What the faithfulness lab costs per image and model: forwards counted, seconds measured.

Per model, on each image's CAM (Grad-CAM at layer4.2 of the predicted class, from the analysis):

- deletion + insertion: 2(S + 1) batched forwards on the inference copy;
- ROAD: 8 imputations (pytorch-grad-cam's noisy linear imputation, a sparse solve each, on the
  CPU) and 8 forwards (the unperturbed score is the deletion curve's s_0);
- the randomisation cascade: one CAM (forward + backward) per block on a deep copy, plus the
  copy and the re-initialisations.

Forwards are counted with a forward pre-hook on the model that runs them (batch rows), not taken
from the formulas above. Also the analysis without faithfulness (median of --repeats), so that
its cost can be compared with a checkout from before the faithfulness work (run this script
from both trees: ``--analysis-only``).

    python benchmarks/bench_faithfulness.py [--images examples/chelsea.jpg] [--steps 32]
        [--precision auto|fp32|bf16] [--device auto] [--repeats 3] [--no-randomization] [--analysis-only]

Prints JSON. Weights: whatever the app would load (untrained if none).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sanet_viz.analysis import AnalysisOptions, analyze  # noqa: E402
from sanet_viz.lab import Lab  # noqa: E402


@contextmanager
def counting(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the input rows of every forward of ``model`` while active."""
    rows = [0]
    handle = model.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + len(args[0])))
    try:
        yield rows
    finally:
        handle.remove()


def time_analysis(lab: Lab, image: object, repeats: int) -> dict[str, float]:
    """Median seconds of the per-image analysis without faithfulness (probe included)."""
    options = AnalysisOptions(precision="fp32")
    analyze(lab, image, options)  # warm-up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        analyze(lab, image, options)
        seconds.append(time.perf_counter() - t)
    return {"median_s": statistics.median(seconds), "all_s": [round(s, 3) for s in seconds]}


def measure_model(lm: object, image: object, cam: object, c: int, *, steps: int, precision: str,
                  randomization: bool) -> dict[str, object]:
    from sanet_viz import faithfulness as fa

    chosen = fa.effective_precision(lm, precision)
    model = lm.probe_model_for(chosen)
    x = image.tensor.to(lm.device)
    marks: list[tuple[float, str]] = []
    out: dict[str, object] = {"precision": chosen}
    with lm.lock, counting(model) as rows:
        t = time.perf_counter()
        deletion, insertion = fa.deletion_insertion(model, x, cam, c, steps=steps, precision=chosen,
                                                    channels_last=lm.fast_model is not None)
        out["deletion_insertion"] = {"forwards": rows[0], "seconds": round(time.perf_counter() - t, 3),
                                     "deletion_auc": deletion.auc, "insertion_auc": insertion.auc}
        rows[0] = 0
        t = time.perf_counter()
        road = fa.road_scores(model, x, cam, c, base_score=float(deletion.scores[0]), precision=chosen,
                              channels_last=lm.fast_model is not None,
                              progress_fn=lambda done, total, what: marks.append((time.perf_counter(), what)))
        end = time.perf_counter()
        imputed_at = marks[len(fa.ROAD_PERCENTILES) * 2 - 1][0]
        out["road"] = {"forwards": rows[0], "imputations": len(fa.ROAD_PERCENTILES) * 2,
                       "imputation_seconds": round(imputed_at - t, 3), "forward_seconds": round(end - imputed_at, 3),
                       "seconds": round(end - t, 3), "combined": road.combined}
    if randomization:
        cams = [0]
        import sanet_viz.cam as cam_module

        original = cam_module.compute_cam

        def counted(*args: object, **kwargs: object) -> object:
            cams[0] += 1
            return original(*args, **kwargs)

        fa.compute_cam = counted  # the cascade calls it through the faithfulness module
        try:
            with lm.lock:
                t = time.perf_counter()
                cascade = fa.measure_randomization(lm, x, cam, c, method="gradcam", layer="layer4.2")
                out["randomization"] = {"cams": cams[0], "blocks": len(cascade.names),
                                        "seconds": round(time.perf_counter() - t, 3),
                                        "spearman_last": float(cascade.spearman[-1])}
        finally:
            fa.compute_cam = original
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", type=Path, default=[ROOT / "examples" / "chelsea.jpg"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-randomization", action="store_true")
    parser.add_argument("--analysis-only", action="store_true",
                        help="only the analysis without faithfulness (to compare two checkouts)")
    args = parser.parse_args()
    lab = Lab.load(device=args.device, log=lambda m: print(m, file=sys.stderr))
    report: dict[str, object] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": str(lab.device), "torch": torch.__version__,
                    "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
        "pretrained": {k: lm.weights.pretrained for k, lm in lab.models.items()}, "images": {}}
    for path in args.images:
        image = lab.prepare(path)
        entry: dict[str, object] = {"analysis_without_faithfulness": time_analysis(lab, image, args.repeats)}
        if not args.analysis_only:
            result = analyze(lab, image, AnalysisOptions(precision="fp32", probe=False))
            for key, mr in result.models.items():
                entry[key] = measure_model(lab.models[key], image, mr.cam, mr.target_class, steps=args.steps,
                                           precision=args.precision, randomization=not args.no_randomization)
        report["images"][path.name] = entry  # type: ignore[index]
    report["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]  # type: ignore[index]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
