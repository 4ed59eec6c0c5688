"""Score-CAM and Ablation-CAM of both models through the engine's batched path, against
pytorch-grad-cam's own classes (optional, slow), and a fast request's latency while a slow one runs.

    python benchmarks/bench_slow_cams.py [--image examples/chelsea.jpg] [--naive] [--fairness]

Prints seconds per model and method, the precision each model's masked forwards used (bf16 only
where the model's bf16 check passed, as for the probe), and the machine. ``--fairness`` starts the
app, submits a Score-CAM through the API and times another client's Grad-CAM meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SANET_VIZ_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from sanet_viz.analysis import AnalysisOptions, analyze, explain_model  # noqa: E402
from sanet_viz.lab import Lab  # noqa: E402


def machine() -> str:
    from bench_analysis import machine_line  # type: ignore[import-not-found]

    return f"{machine_line(torch.device('cpu'))}, load {os.getloadavg()[0]:.1f}"


def engine(lab: Lab, image: object, method: str) -> dict[str, tuple[float, str]]:
    out = {}
    for key, lm in lab.models.items():
        options = AnalysisOptions(method=method, probe=False)
        start = time.perf_counter()
        explain_model(lm, image, options)  # type: ignore[arg-type]
        out[key] = (time.perf_counter() - start, lm.probe_precision("auto").replace("check", "fp32"))
    return out


def naive(lab: Lab, image: object, method: str) -> dict[str, float]:
    from pytorch_grad_cam import AblationCAM, ScoreCAM

    out = {}
    for key, lm in lab.models.items():
        model = copy.deepcopy(lm.model).eval()
        cls = ScoreCAM if method == "scorecam" else AblationCAM
        start = time.perf_counter()
        with cls(model=model, target_layers=[model.get_submodule("layer4.2")]) as cam:
            cam.batch_size = 16
            cam(input_tensor=image.tensor)  # type: ignore[attr-defined]
        out[key] = time.perf_counter() - start
    return out


def fairness(image: Path) -> None:
    import load_test as lt  # type: ignore[import-not-found]
    from gradio_client import Client, handle_file

    port = lt.free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR="/tmp/sanet-viz-bench-fairness")
    with open("/tmp/sanet-viz-bench-fairness.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--resnet50", "untrained",
                                 "--sanet50", "untrained"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        lt.wait_ready(url, proc, timeout=600.0)
        start = time.perf_counter()
        slow = Client(url, verbose=False).submit(handle_file(str(image)), "scorecam", api_name="/analyze")
        time.sleep(5)
        t = time.perf_counter()
        Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "coffee.jpg")), api_name="/analyze")
        fast = time.perf_counter() - t
        running = not slow.done()
        slow.result(timeout=1800)
        print(f"fairness: another client's Grad-CAM took {fast:.1f} s while the Score-CAM was "
              f"{'still running' if running else 'already done'}; the Score-CAM request (both models, with "
              f"its probe) took {time.perf_counter() - start:.1f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "chelsea.jpg")
    parser.add_argument("--methods", default="scorecam,ablationcam")
    parser.add_argument("--naive", action="store_true", help="also time pytorch-grad-cam's classes (minutes)")
    parser.add_argument("--fairness", action="store_true", help="time a Grad-CAM while a Score-CAM runs in the app")
    args = parser.parse_args()
    print(machine())
    lab = Lab.load(resnet50="untrained", sanet50="untrained", device="cpu")
    image = lab.prepare(args.image)
    analyze(lab, image, AnalysisOptions(), name=args.image.name)  # the app's warm-up: bf16 check, first calls
    for lm in lab.models.values():
        print(f"{lm.display_name}: {lm.bf16_check.describe() if lm.bf16_check else 'fp32'}")
    for method in args.methods.split(","):
        ours = engine(lab, image, method)
        line = ", ".join(f"{k} {s:.1f} s ({p})" for k, (s, p) in ours.items())
        print(f"{method}: ours {line}; both {sum(s for s, _ in ours.values()):.1f} s")
        if args.naive:
            theirs = naive(lab, image, method)
            print(f"{method}: pytorch-grad-cam " + ", ".join(f"{k} {s:.1f} s (fp32)" for k, s in theirs.items())
                  + f"; both {sum(theirs.values()):.1f} s")
    if args.fairness:
        fairness(args.image)


if __name__ == "__main__":
    main()
