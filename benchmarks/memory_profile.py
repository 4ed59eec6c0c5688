"""Resident memory of the app over a mixed series of requests, and with several clients at once.

    .venv/bin/python benchmarks/memory_profile.py                                  # all eight CAM methods
    .venv/bin/python benchmarks/memory_profile.py --methods gradcam,eigencam --clients 1,2,4 --json mem.json
    .venv/bin/python benchmarks/memory_profile.py --app-args "--concurrency 1"     # flags for app.py

Starts ``app.py`` on a free port (untrained weights unless ``--resnet50/--sanet50``; environment
from ``--env NAME=VALUE``), then sends through gradio_client, one after another: an analysis
with each CAM method of ``--methods`` (SANet50's probe included, as the app does), one with
ResNet50's probe as well, and a class correlation of the example pictures. A thread reads the
server's VmRSS and VmHWM from /proc every ``--interval`` seconds. Printed: per request its time,
the peak resident memory while it ran and the resident memory just after; the peak of the whole
series (VmHWM); the settled value ``--settle`` seconds after the last request. With
``--clients 1,2,4`` the series is then sent by N clients at once (the app runs up to
``--concurrency`` of them together; default: the largest N), to show how memory grows with
concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_test as lt

ROOT = lt.ROOT
ALL_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam"]


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB, from /proc (psutil is not needed)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


class Sampler(threading.Thread):
    """Reads the server's resident memory every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(name="rss sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, VmRSS MiB)
        self.hwm = 0.0
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                rss, hwm = proc_memory_mb(self.pid)
            except (OSError, KeyError):  # the server is gone
                return
            with self.lock:
                self.samples.append((time.monotonic(), rss))
                self.hwm = hwm
            self.stopped.wait(self.interval)

    def peak(self, start: float, end: float) -> float:
        with self.lock:
            inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside) if inside else self.latest()

    def latest(self) -> float:
        return proc_memory_mb(self.pid)[0]


@dataclass
class Measured:
    request: str
    seconds: float
    peak_mb: float
    after_mb: float
    error: str = ""


def requests_of(methods: list[str], images: list[Path],
                pairs: Sequence[str] = ()) -> list[tuple[str, Callable[[Any], Any]]]:
    """The series: (name, call with a gradio_client.Client); ``pairs`` ("KEY,KEY") are analysed
    with Grad-CAM after the methods, each loading its models on first use."""
    from gradio_client import handle_file

    first = str(images[0])

    def analyze(method: str, probe_resnet: bool = False, models: str = "") -> Callable[[Any], Any]:
        return lambda c: c.predict(handle_file(first), method=method, probe_resnet=probe_resnet,
                                   models=models, api_name="/analyze")

    series = [(f"analyze {m}", analyze(m)) for m in methods]
    series += [(f"analyze gradcam, pair {pair}", analyze("gradcam", models=pair)) for pair in pairs]
    series.append(("analyze gradcam + ResNet50 probe", analyze("gradcam", probe_resnet=True)))
    labels = "\n".join("ab"[i % 2] for i in range(len(images)))
    series.append((f"correlate {len(images)} images",
                   lambda c: c.predict([handle_file(str(p)) for p in images], labels, api_name="/correlate")))
    return series


def run_series(url: str, sampler: Sampler, series: list[tuple[str, Callable[[Any], Any]]],
               after_s: float) -> list[Measured]:
    client = lt.client(url)
    rows = []
    for name, call in series:
        start = time.monotonic()
        error = ""
        try:
            call(client)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            error = f"{type(exc).__name__}: {exc}"[:200]
        end = time.monotonic()
        time.sleep(after_s)
        rows.append(Measured(name, round(end - start, 1), round(sampler.peak(start, time.monotonic()), 0),
                             round(sampler.latest(), 0), error))
        print(f"  {name}: {rows[-1].seconds} s, peak {rows[-1].peak_mb:.0f} MB, after {rows[-1].after_mb:.0f} MB"
              + (f" ({error})" if error else ""), file=sys.stderr, flush=True)
    return rows


def run_concurrent(url: str, sampler: Sampler, series: list[tuple[str, Callable[[Any], Any]]], clients: int,
                   settle_s: float) -> dict[str, Any]:
    """``clients`` clients, each sending the whole series, all at once."""
    errors: list[str] = []
    start = time.monotonic()

    def visitor(i: int) -> None:
        client = lt.client(url)
        for name, call in series[i % len(series):] + series[: i % len(series)]:  # staggered order
            try:
                call(client)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=visitor, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic()
    time.sleep(settle_s)
    return {"clients": clients, "requests": clients * len(series), "seconds": round(end - start, 1),
            "peak_mb": round(sampler.peak(start, end), 0), "settled_mb": round(sampler.latest(), 0),
            "errors": errors[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated CAM methods")
    p.add_argument("--images", nargs="+", type=Path, default=lt.DEFAULT_IMAGES, help="the first is analysed")
    p.add_argument("--clients", default="", help="also N clients at once, e.g. 1,2,4")
    p.add_argument("--concurrency", type=int, help="the app's --concurrency (default: the largest N)")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--after", type=float, default=1.0, help="seconds after a request before 'after' is read")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the series before 'settled' is read")
    p.add_argument("--resnet50", default="untrained")
    p.add_argument("--sanet50", default="untrained")
    p.add_argument("--app-args", default="", help="more flags for app.py")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the app")
    p.add_argument("--pairs", nargs="*", default=[], metavar="KEY,KEY",
                   help="also analyse with these pairs (the app loads their models on first use), e.g. "
                        "sanet50,seresnet50 seresnet50,ecaresnet50d")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {','.join(ALL_METHODS)}")
    clients = [int(n) for n in args.clients.split(",") if n.strip()]
    concurrency = args.concurrency or max([2, *clients])
    env = dict(item.split("=", 1) for item in args.env)
    work = Path(tempfile.mkdtemp(prefix="sanet-viz-memory-"))
    print(f"[memory] starting app.py (log: {work / 'app.log'})", file=sys.stderr, flush=True)
    proc, url = lt.start_app(["--resnet50", args.resnet50, "--sanet50", args.sanet50, "--weights-dir",
                              str(work / "no-weights"), "--concurrency", str(concurrency),
                              *shlex.split(args.app_args)], log_path=work / "app.log",
                             env={"GRADIO_TEMP_DIR": str(work / "gradio"), **env})
    sampler = Sampler(proc.pid, args.interval)
    sampler.start()
    report: dict[str, Any] = {"machine": lt.machine(), "methods": methods, "env": env, "app_args": args.app_args,
                              "concurrency": concurrency}
    try:
        lt.wait_idle(url)
        time.sleep(args.settle)
        report["ready_mb"] = round(sampler.latest(), 0)
        print(f"[memory] ready: {report['ready_mb']:.0f} MB resident", file=sys.stderr, flush=True)
        series = requests_of(methods, args.images, args.pairs)
        rows = run_series(url, sampler, series, args.after)
        lt.wait_idle(url)
        time.sleep(args.settle)
        report.update(series=[asdict(r) for r in rows], series_peak_mb=round(max(r.peak_mb for r in rows), 0),
                      hwm_mb=round(sampler.hwm, 0), settled_mb=round(sampler.latest(), 0))
        report["concurrent"] = [run_concurrent(url, sampler, series, n, args.settle) for n in clients]
        report["hwm_end_mb"] = round(proc_memory_mb(proc.pid)[1], 0)
    finally:
        sampler.stopped.set()
        report["exit_status"] = lt.stop_app(proc)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if all(not r["error"] for r in report.get("series", [])) else 1


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), load average "
          f"{m['load_avg'][0]:.1f}; untrained weights unless given; app env {report['env'] or 'default'}"
          f"{'; app flags ' + report['app_args'] if report['app_args'] else ''}")
    print(f"ready (after the warm-up analysis): {report['ready_mb']:.0f} MB resident\n")
    print("| request | s | peak MB | after MB |\n|---|---:|---:|---:|")
    for r in report.get("series", []):
        print(f"| {r['request']}{' (error: ' + r['error'] + ')' if r['error'] else ''} | {r['seconds']} | "
              f"{r['peak_mb']:.0f} | {r['after_mb']:.0f} |")
    if "series" in report:
        seconds = [r["seconds"] for r in report["series"]]
        print(f"\nseries: peak {report['series_peak_mb']:.0f} MB (VmHWM {report['hwm_mb']:.0f} MB), settled "
              f"{report['settled_mb']:.0f} MB; requests took {sum(seconds):.0f} s (median "
              f"{statistics.median(seconds):.1f} s)")
    if report.get("concurrent"):
        print(f"\n| clients at once (app --concurrency {report['concurrency']}) | requests | s | peak MB | "
              "settled MB | errors |\n|---:|---:|---:|---:|---:|---|")
        for c in report["concurrent"]:
            print(f"| {c['clients']} | {c['requests']} | {c['seconds']} | {c['peak_mb']:.0f} | {c['settled_mb']:.0f} "
                  f"| {'; '.join(c['errors']) or 'none'} |")
    print(f"\nVmHWM at the end: {report.get('hwm_end_mb', 0):.0f} MB; app exit status {report['exit_status']}")


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
