"""Many visitors through the API: concurrency, queue limits, memory and hooks of a running app.

    .venv/bin/python benchmarks/load_test.py                       # the issue's numbers
    .venv/bin/python benchmarks/load_test.py --clients 8 --requests 5 --sequential 100 --out report.json
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:7860/   # an app already running

Without ``--url`` it starts ``app.py`` on a free port with ``SANET_VIZ_DEBUG_STATS=1`` (the
``/debug_stats`` route that reports hook counts, gradients and locks on the shared models) and
untrained weights unless ``--resnet50/--sanet50`` are given. With ``--url`` the app must have been
started with ``SANET_VIZ_DEBUG_STATS=1`` on this machine (resident memory is read from /proc).

Checks, each reported as pass/fail (exit status 1 if any fails):

1. single: each image analysed alone, one after another: the reference results.
2. burst: ``--clients`` clients, each sending ``--requests`` analyses at once: every request
   completes within ``--timeout``, and every result equals the single-request result for its
   image (same top-5 classes, probabilities, CAM target, group probe scores and SA gates).
3. queue: ``concurrency`` requests running and ``queue-size`` waiting, then ``--overflow`` more:
   exactly those extra ones are refused ("queue is full"), the accepted ones complete (or are
   cancelled with ``--cancel-queued``, to keep the run short with a large queue).
4. sequential: ``--sequential`` analyses in a row: resident memory after the last is within
   ``--rss-tolerance`` (10 %) of that after ``--warmup`` requests, and the hook counts on the
   models never differ from those at start.

tests/test_hardening.py runs a short variant of the same functions in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = [ROOT / "examples" / n for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")]


# ---------------------------------------------------------------------------------------------
# The app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
              port: int | None = None, script: Path = ROOT / "app.py") -> tuple[subprocess.Popen[bytes], str]:
    """``app.py`` (or ``script``, which runs it) in a subprocess with the debug route on; returns
    the process and its URL."""
    port = port or free_port()
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SANET_VIZ_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                "SANET_VIZ_DEBUG_STATS": "1", **(env or {})}
    full_env.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="sanet-viz-load-"))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), *args], cwd=ROOT,
                                env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    wait_ready(url, proc)
    return proc, url


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"app exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_app(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False)


def debug_stats(url: str) -> dict[str, Any]:
    return client(url).predict(api_name="/debug_stats")


def model_state(stats: dict[str, Any]) -> dict[str, Any]:
    """What must be the same before and after any request: hooks, gradients, modes (not ``busy``)."""
    return {"global_hooks": stats["global_hooks"],
            **{f"{k}.{name}": v for k, m in stats["models"].items() for name, v in m.items() if name != "busy"}}


def wait_idle(url: str, timeout: float = 300.0) -> dict[str, Any]:
    """Stats once no model lock is held (a cancelled request's thread finishes its step first)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = debug_stats(url)
        if not any(m["busy"] for m in stats["models"].values()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Requests and results

def result_of(outputs: Sequence[Any]) -> dict[str, Any]:
    found = [o for o in outputs if isinstance(o, dict) and "models" in o]
    if len(found) != 1:
        raise AssertionError(f"expected one result dict among the outputs, got {outputs!r}")
    return found[0]


def analyze(url: str, image: Path, gradio_client: Any = None) -> dict[str, Any]:
    from gradio_client import handle_file

    c = gradio_client or client(url)
    return result_of(c.predict(handle_file(str(image)), api_name="/analyze"))


def fingerprint(result: dict[str, Any]) -> dict[str, Any]:
    """The parts of a result that concurrency must not change."""
    out: dict[str, Any] = {}
    for key, m in result["models"].items():
        out[key] = {
            "top5": [p["index"] for p in m["top5"]],
            "probs": [p["prob"] for p in m["top5"]],
            "target": m["target_class"],
            "probe": (m["group_probe"] or {}).get("scores"),
            "gates": {name: g["channel"] + g["spatial"] for name, g in (m.get("sa_gates") or {}).items()},
        }
    return out


def differences(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-5) -> list[str]:
    """Human-readable differences between two fingerprints (empty when equal within ``tol``)."""
    diffs: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            if set(x) != set(y):
                diffs.append(f"{path}: keys {sorted(x)} != {sorted(y)}")
            for k in set(x) & set(y):
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                diffs.append(f"{path}: length {len(x)} != {len(y)}")
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float) or isinstance(y, float):
            if x is None or y is None or abs(float(x) - float(y)) > tol:
                diffs.append(f"{path}: {x} != {y}")
        elif x != y:
            diffs.append(f"{path}: {x!r} != {y!r}")

    walk(a, b, "")
    return diffs


@dataclass
class Check:
    name: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)


def single(url: str, images: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], Check]:
    references, latencies = {}, {}
    for image in images:
        t = time.perf_counter()
        references[str(image)] = fingerprint(analyze(url, image))
        latencies[image.name] = round(time.perf_counter() - t, 2)
    return references, Check("single", True, {"latency_s": latencies})


def burst(url: str, images: Sequence[Path], references: dict[str, dict[str, Any]], *, clients: int,
          requests: int, timeout: float) -> Check:
    """``clients`` threads, each with its own client, each sending ``requests`` analyses in a row."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def visitor(c: int) -> None:
        gc = client(url)
        for r in range(requests):
            image = images[(c + r) % len(images)]
            t = time.perf_counter()
            try:
                diff = differences(references[str(image)], fingerprint(analyze(url, image, gc)))
                record = {"client": c, "request": r, "image": image.name, "ok": not diff, "diff": diff[:5]}
            except Exception as exc:  # noqa: BLE001 - reported, and the check fails
                record = {"client": c, "request": r, "image": image.name, "ok": False,
                          "error": f"{type(exc).__name__}: {exc}"}
            record["latency_s"] = round(time.perf_counter() - t, 2)
            with lock:
                records.append(record)

    start = time.perf_counter()
    threads = [threading.Thread(target=visitor, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, timeout - (time.perf_counter() - start)))
    hung = sum(t.is_alive() for t in threads)
    wall = time.perf_counter() - start
    latencies = sorted(r["latency_s"] for r in records)
    ok = hung == 0 and len(records) == clients * requests and all(r["ok"] for r in records)
    return Check("burst", ok, {
        "clients": clients, "requests_each": requests, "completed": len(records), "hung_clients": hung,
        "failed": [r for r in records if not r["ok"]][:10], "wall_s": round(wall, 1),
        "throughput_per_min": round(60 * len(records) / wall, 2) if wall else None,
        "latency_s": {"min": latencies[0], "median": latencies[len(latencies) // 2], "max": latencies[-1]}
        if latencies else {}})


def _wait_status(job: Any, names: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = job.status().code.name
        if code in names or job.done():
            return code
        time.sleep(0.2)
    return job.status().code.name


def queue_limit(url: str, images: Sequence[Path], *, concurrency: int, queue_size: int, overflow: int = 1,
                cancel_queued: bool = False, timeout: float = 600.0,
                references: dict[str, dict[str, Any]] | None = None) -> Check:
    """Fill the running slots, then the queue, then send ``overflow`` more: only those are refused.

    Jobs take the images in turn; with ``references``, every completed result must equal the
    single-request result for its image.
    """
    from gradio_client import handle_file

    running_states = {"PROCESSING", "PROGRESS", "ITERATING"}
    jobs: list[tuple[str, Path, Any]] = []

    def send(i: int) -> tuple[Path, Any]:
        image = images[i % len(images)]
        return image, client(url).submit(handle_file(str(image)), api_name="/analyze")

    for i in range(concurrency):  # one at a time: each is running before the next is sent
        image, job = send(i)
        jobs.append(("running", image, job))
        _wait_status(job, running_states, 120)
    for i in range(concurrency, concurrency + queue_size):
        image, job = send(i)
        jobs.append(("queued", image, job))
        _wait_status(job, {"IN_QUEUE"} | running_states, 60)
    refused, accepted_extra = [], 0
    for i in range(overflow):
        _, job = send(i)
        try:
            job.result(timeout=60)
            accepted_extra += 1
        except Exception as exc:  # noqa: BLE001 - the refusal is what we want to see
            refused.append(f"{type(exc).__name__}: {exc}")
    clean_refusals = [r for r in refused if "queue is full" in r.lower()]
    if cancel_queued:
        for kind, _, job in jobs:
            if kind == "queued":
                _cancel(job)
    completed, errors, diffs = 0, [], []
    deadline = time.monotonic() + timeout
    for kind, image, job in jobs:
        if cancel_queued and kind == "queued":
            continue
        try:
            out = job.result(timeout=max(1.0, deadline - time.monotonic()))
            completed += 1
            if references is not None:
                diffs += [f"{image.name}: {d}" for d in
                          differences(references[str(image)], fingerprint(result_of(out)))]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    expected = concurrency if cancel_queued else concurrency + queue_size
    ok = (accepted_extra == 0 and len(clean_refusals) == overflow and completed == expected
          and not errors and not diffs)
    return Check("queue", ok, {"concurrency": concurrency, "queue_size": queue_size, "overflow": overflow,
                               "refused": refused, "accepted_beyond_limit": accepted_extra,
                               "completed": completed, "expected_completed": expected, "errors": errors,
                               "diffs": diffs[:5], "queued_cancelled": cancel_queued})


def _cancel(job: Any) -> None:
    """``Job.cancel`` with patience: the server answers once the running step has finished."""
    import contextlib

    import httpx

    # The server still cancels on a timeout; its answer just took longer than the client's 5 s.
    with contextlib.suppress(httpx.TimeoutException):
        job.cancel()


def sequential(url: str, pid: int, image: Path, *, n: int, warmup: int, tolerance: float,
               progress: Callable[[str], None] | None = None) -> Check:
    gc = client(url)
    start_state = model_state(wait_idle(url))
    rss, state_changes = [], []
    for i in range(n):
        analyze(url, image, gc)
        state = model_state(wait_idle(url))
        if state != start_state:
            state_changes.append({"after_request": i + 1, "state": state})
        rss.append(round(rss_mb(pid), 1))
        if progress and (i + 1) % 10 == 0:
            progress(f"sequential: {i + 1}/{n}, rss {rss[-1]:.0f} MB")
    base = rss[warmup - 1] if len(rss) >= warmup else rss[0]
    growth = rss[-1] / base - 1
    ok = not state_changes and abs(growth) <= tolerance
    return Check("sequential", ok, {
        "requests": n, "warmup": warmup, "rss_mb_after_warmup": base, "rss_mb_last": rss[-1],
        "rss_mb_max_after_warmup": max(rss[warmup - 1:]) if len(rss) >= warmup else max(rss),
        "growth_after_warmup": round(growth, 4), "tolerance": tolerance, "rss_mb": rss,
        "hook_or_state_changes": state_changes[:5], "start_state": start_state})


# ---------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), platform.processor()),
            "load_avg": os.getloadavg()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an app already running (with SANET_VIZ_DEBUG_STATS=1, on this machine)")
    p.add_argument("--pid", type=int, help="its process id, for resident memory (default: found by port)")
    p.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5, help="per client, in a row")
    p.add_argument("--sequential", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--concurrency", type=int, default=2, help="the app's --concurrency")
    p.add_argument("--queue-size", type=int, default=32, help="the app's --queue-size")
    p.add_argument("--overflow", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600.0, help="for the burst, in seconds")
    p.add_argument("--resnet50", default="untrained")
    p.add_argument("--sanet50", default="untrained")
    p.add_argument("--skip", nargs="*", default=[], choices=["burst", "queue", "sequential"])
    p.add_argument("--out", type=Path, help="write the report as JSON")
    args = p.parse_args(argv)

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    proc = None
    if args.url:
        url, pid = args.url, args.pid or _pid_listening(args.url)
    else:
        log_path = Path(tempfile.mkdtemp(prefix="sanet-viz-load-")) / "app.log"
        say(f"starting app.py (log: {log_path})")
        proc, url = start_app(["--resnet50", args.resnet50, "--sanet50", args.sanet50,
                               "--queue-size", str(args.queue_size), "--concurrency", str(args.concurrency),
                               "--weights-dir", tempfile.mkdtemp(prefix="sanet-viz-noweights-")],
                              log_path=log_path)
        pid = proc.pid
    report: dict[str, Any] = {"machine": machine(), "url": url, "args": {k: str(v) for k, v in vars(args).items()}}
    checks: list[Check] = []
    try:
        say(f"app ready at {url}, rss {rss_mb(pid):.0f} MB; single-request references")
        references, check = single(url, args.images)
        checks.append(check)
        if "burst" not in args.skip:
            say(f"burst: {args.clients} clients x {args.requests} requests")
            checks.append(burst(url, args.images, references, clients=args.clients, requests=args.requests,
                                timeout=args.timeout))
            say(f"burst: {checks[-1].passed} {checks[-1].details.get('wall_s')} s")
        if "queue" not in args.skip:
            say(f"queue: {args.concurrency} running + {args.queue_size} queued + {args.overflow} over")
            checks.append(queue_limit(url, args.images, concurrency=args.concurrency,
                                      queue_size=args.queue_size, overflow=args.overflow,
                                      cancel_queued=args.queue_size > 4, references=references))
            say(f"queue: {checks[-1].passed}")
        if "sequential" not in args.skip:
            say(f"sequential: {args.sequential} requests")
            checks.append(sequential(url, pid, args.images[0], n=args.sequential, warmup=args.warmup,
                                     tolerance=args.rss_tolerance, progress=say))
            say(f"sequential: {checks[-1].passed}")
        report["final_stats"] = wait_idle(url)
    finally:
        if proc is not None:
            t = time.perf_counter()
            report["sigterm_exit"] = {"status": stop_app(proc), "seconds": round(time.perf_counter() - t, 1)}
    report["checks"] = [asdict(c) for c in checks]
    for c in checks:
        brief = {k: v for k, v in c.details.items() if k not in {"rss_mb", "start_state"}}
        print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {json.dumps(brief)[:600]}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if all(c.passed for c in checks) else 1


def _pid_listening(url: str) -> int:
    port = url.rstrip("/").rsplit(":", 1)[-1]
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


if __name__ == "__main__":
    raise SystemExit(main())
