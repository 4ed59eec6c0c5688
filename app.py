"""sanet-viz web app: ``python app.py`` (flags below; each has an environment variable).

The module-level ``demo`` is what Hugging Face Spaces and ``gradio app.py`` look for; it is built
from the environment, or from the command line when run as a script.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # until the server runs, SIGTERM just exits: imports and loading take a while
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# A folder of our own for uploads and outputs (not /tmp/gradio, which other apps may share): the
# janitor below deletes what is older than --cache-ttl there.
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "sanet-viz-gradio"))

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from sanet_viz.analysis import AnalysisOptions, Lab, analyze  # noqa: E402
from sanet_viz.preprocessing import DecodeLimits, load_and_prepare, parse_size  # noqa: E402
from sanet_viz.ui import CSS, THEME, AppSettings, build_demo  # noqa: E402
from sanet_viz.weights import WeightsError  # noqa: E402

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("sanet-viz")


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="sanet-viz: ResNet50 vs SANet50 in the browser")
    p.add_argument("--host", default=env("SANET_VIZ_HOST", "127.0.0.1"),
                   help="interface to listen on; 0.0.0.0 in containers ($SANET_VIZ_HOST)")
    p.add_argument("--port", type=int, default=int(env("SANET_VIZ_PORT", env("PORT", "7860"))),
                   help="port ($SANET_VIZ_PORT)")
    p.add_argument("--device", default=env("SANET_VIZ_DEVICE", "auto"), help="auto, cpu, cuda ($SANET_VIZ_DEVICE)")
    p.add_argument("--resnet50", default=env("SANET_VIZ_RESNET50"), metavar="SPEC",
                   help="ResNet50 weights: path, URL, hf://owner/repo/file or 'untrained' ($SANET_VIZ_RESNET50)")
    p.add_argument("--sanet50", default=env("SANET_VIZ_SANET50"), metavar="SPEC",
                   help="SANet50 weights: path, URL, hf://owner/repo/file or 'untrained' ($SANET_VIZ_SANET50)")
    p.add_argument("--weights-dir", type=Path, default=Path(env("SANET_VIZ_WEIGHTS_DIR", ROOT / "weights")),
                   help="folder searched for weights files ($SANET_VIZ_WEIGHTS_DIR)")
    p.add_argument("--max-file-size", type=parse_size, default=parse_size(env("SANET_VIZ_MAX_FILE_SIZE", "20mb")),
                   help="largest upload, e.g. 20mb, 512kb, or bytes ($SANET_VIZ_MAX_FILE_SIZE)")
    p.add_argument("--max-pixels", type=int, default=int(env("SANET_VIZ_MAX_PIXELS", "50000000")),
                   help="largest decoded image in pixels ($SANET_VIZ_MAX_PIXELS)")
    p.add_argument("--queue-size", type=int, default=int(env("SANET_VIZ_QUEUE_SIZE", "32")),
                   help="requests that may wait before new ones are refused ($SANET_VIZ_QUEUE_SIZE)")
    p.add_argument("--concurrency", type=int, default=int(env("SANET_VIZ_CONCURRENCY", "2")),
                   help="analyses that run at once; the rest wait in the queue ($SANET_VIZ_CONCURRENCY)")
    p.add_argument("--profiles", type=Path, default=env("SANET_VIZ_PROFILES") or None,
                   help="profiles.npz from `python -m sanet_viz reproduce`: show each image's nearest "
                        "classes by SA profile ($SANET_VIZ_PROFILES)")
    p.add_argument("--cache-ttl", type=int, default=int(env("SANET_VIZ_CACHE_TTL", "3600")),
                   help="seconds before uploads and outputs are deleted from the server ($SANET_VIZ_CACHE_TTL)")
    p.add_argument("--shutdown-grace", type=float, default=float(env("SANET_VIZ_SHUTDOWN_GRACE", "30")),
                   help="on SIGTERM, seconds that running and queued requests get to finish "
                        "($SANET_VIZ_SHUTDOWN_GRACE)")
    p.add_argument("--root-path", default=env("SANET_VIZ_ROOT_PATH", env("GRADIO_ROOT_PATH")),
                   help="URL prefix when served behind a proxy, e.g. /sanet ($SANET_VIZ_ROOT_PATH)")
    p.add_argument("--require-pretrained", action="store_true",
                   default=env("SANET_VIZ_REQUIRE_PRETRAINED", "") in {"1", "true"},
                   help="refuse to start with untrained models ($SANET_VIZ_REQUIRE_PRETRAINED=1)")
    return p.parse_args(argv)


def engine_stats(lab: Lab) -> dict[str, Any]:
    """Hooks, gradients and locks on the shared models, and this process's memory (debug route)."""
    import torch
    from torch.nn.modules import module as torch_module

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
    rss_kb = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    except OSError:
        pass
    return {"models": models, "global_hooks": global_hooks, "rss_mb": rss_kb / 1024,
            "threads": threading.active_count(), "torch_threads": torch.get_num_threads()}


class CacheJanitor(threading.Thread):
    """Deletes files older than ``ttl_s`` from Gradio's temp folder, every ``every_s`` seconds.

    Gradio's own ``delete_cache`` only knows the files it tracked, and it loses track of outputs
    of components that a generator updated with ``gr.update()`` (the /analyze outputs: overlays,
    charts, the zip), which would then stay forever. Copies of the examples are kept.
    """

    def __init__(self, demo: gr.Blocks, folder: Path, ttl_s: float, every_s: float) -> None:
        super().__init__(name="sanet-viz cache janitor", daemon=True)
        self.demo, self.folder, self.ttl_s, self.every_s = demo, folder, ttl_s, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.sweep()

    def sweep(self) -> int:
        keep = {str(p) for block in getattr(self.demo, "blocks", {}).values()
                for p in getattr(block, "keep_in_cache", ())}
        cutoff, removed = time.time() - self.ttl_s, 0
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            try:
                if path.is_symlink() or path.is_file():
                    st = path.lstat()
                    if str(path) not in keep and max(st.st_mtime, st.st_ctime) < cutoff:
                        path.unlink()
                        removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:
                pass  # gone already, or in use
        if removed:
            log.info("cache: deleted %d file(s) older than %.0f s from %s", removed, self.ttl_s, self.folder)
        return removed


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse a Gradio temp folder that would make the app's own files servable."""
    temp = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    for private in (ROOT, Path(args.weights_dir).resolve()):
        if temp == private or temp in private.parents:  # everything under the temp folder is served
            raise SystemExit(f"GRADIO_TEMP_DIR={temp} would serve {private} to visitors; choose another folder")


WARM_UP_IMAGE = ROOT / "examples" / "chelsea.jpg"


def warm_up(lab: Lab, image_path: Path = WARM_UP_IMAGE) -> None:
    """One full analysis before the first visitor.

    First-call costs (allocations, oneDNN kernel choices, the bf16 copies) are paid here, and
    ``auto`` precision's bf16 check runs on a fixed picture: every visitor's probe then runs in the
    same precision, so the same image always gets the same scores.
    """
    if not image_path.is_file():
        log.warning("warm-up skipped: %s is missing; the first visitor pays the first-call costs", image_path)
        return
    start = time.perf_counter()
    analyze(lab, load_and_prepare(image_path), AnalysisOptions(), name=image_path.name)
    for lm in lab.models.values():
        log.info("%s: %s", lm.display_name, lm.bf16_check.describe() if lm.bf16_check else "probes run in fp32")
    log.info("warm-up analysis done in %.1f s", time.perf_counter() - start)


def create_demo(args: argparse.Namespace) -> gr.Blocks:
    """Load both models once (progress in the log) and build the Blocks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check_paths(args)
    lab = Lab.load(resnet50=args.resnet50, sanet50=args.sanet50, device=args.device,
                   weights_dir=args.weights_dir, require_pretrained=args.require_pretrained, log=log.info)
    warm_up(lab)
    limits = DecodeLimits(max_pixels=args.max_pixels, max_bytes=args.max_file_size)
    profiles = None
    if args.profiles:
        from sanet_viz.reproduce import load_profiles

        profiles = load_profiles(args.profiles)
        log.info("profiles: %d classes from %d images (%s)", len(profiles.classes), profiles.images, args.profiles)
    settings = AppSettings(limits=limits, cache_ttl_s=args.cache_ttl, output_ttl_s=args.cache_ttl,
                           concurrency=args.concurrency, profiles=profiles)
    demo = build_demo(lab, settings)
    if os.environ.get("SANET_VIZ_DEBUG_STATS", "") in {"1", "true"}:
        log.warning("SANET_VIZ_DEBUG_STATS: /debug_stats shows hook counts and memory; not for public servers")

        def debug_stats() -> dict[str, Any]:
            return engine_stats(lab)

        with demo:
            gr.api(debug_stats, api_name="debug_stats", concurrency_limit=None, api_visibility="undocumented")
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.weight_files = [lm.weights.source for lm in lab.models.values()  # type: ignore[attr-defined]
                         if lm.weights.pretrained and Path(lm.weights.source).is_file()]
    return demo


class GracefulStop:
    """SIGTERM: refuse new requests, let running and queued ones finish (up to ``grace_s``), exit 0.

    A second signal exits at once.
    """

    def __init__(self, demo: gr.Blocks | None = None, grace_s: float = 30.0) -> None:
        self.demo, self.grace_s, self.stopping = demo, grace_s, False

    def install(self) -> GracefulStop:
        signal.signal(signal.SIGTERM, self)
        return self

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:  # a second signal while draining
            log.info("signal %s again: exiting now", signum)
            os._exit(0)
        if self.demo is None or not getattr(self.demo, "is_running", False):  # still loading
            log.info("signal %s: exiting", signum)
            sys.exit(0)
        self.stopping = True
        had_work = sum(self._pending()) > 0
        log.info("signal %s: refusing new requests; waiting up to %.0f s for %d running and %d queued",
                 signum, self.grace_s, *self._pending())
        queue = self.demo._queue

        async def refuse(*args: Any, **kwargs: Any) -> tuple[bool, str, str]:
            return False, "The server is shutting down; please try again in a minute.", "queue_full"

        queue.push = refuse  # type: ignore[method-assign]
        deadline = time.monotonic() + self.grace_s
        while sum(self._pending()) and time.monotonic() < deadline:
            time.sleep(0.2)
        running, waiting = self._pending()
        if running or waiting:
            log.warning("shutdown grace over: dropping %d running and %d queued requests", running, waiting)
        elif had_work:  # clients fetch result files after the last message: serve until requests stop
            self._until_quiet(quiet_s=1.5, limit_s=max(0.0, min(10.0, deadline - time.monotonic())))
        server = getattr(self.demo, "server", None)
        if getattr(server, "config", None) is not None:  # idle streams (heartbeats) must not hold up
            server.config.timeout_graceful_shutdown = 2  # the exit, nor the deletion of Gradio's files
        self.demo.close()
        log.info("stopped")
        logging.shutdown()
        sys.exit(0)

    def _until_quiet(self, quiet_s: float, limit_s: float) -> None:
        state = getattr(getattr(self.demo, "server", None), "server_state", None)
        if state is None:
            return
        end, last, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < end:
            if state.total_requests != last:
                last, since = state.total_requests, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    def _pending(self) -> tuple[int, int]:
        queue = getattr(self.demo, "_queue", None)
        if queue is None:
            return 0, 0
        running = sum(len(job) for job in getattr(queue, "active_jobs", []) if job)
        try:
            waiting = len(queue)
        except TypeError:
            waiting = 0
        return running, waiting


def _blocked_paths(args: argparse.Namespace, demo: gr.Blocks) -> list[str]:
    """Weights that lie inside a folder the app serves, to be refused there too.

    Only those: Gradio lists every blocked path in the error it returns for a refused path, and
    weights outside the served folders are refused anyway, without telling anyone where they are.
    """
    served = [ROOT / "examples", Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"),
              Path(os.environ.get("GRADIO_EXAMPLES_CACHE", ".gradio/cached_examples"))]
    served = [s.resolve() for s in served]
    weights = [Path(args.weights_dir), *map(Path, getattr(demo, "weight_files", []))]
    return [str(w) for w in weights if any(w.resolve() == s or s in w.resolve().parents for s in served)]


def launch(demo: gr.Blocks, args: argparse.Namespace) -> None:
    GracefulStop(demo, args.shutdown_grace).install()
    janitor = CacheJanitor(demo, Path(get_upload_folder()), args.cache_ttl,
                           every_s=max(1, min(1800, args.cache_ttl // 2)))
    janitor.sweep()  # what earlier runs left behind
    janitor.start()
    blocked = _blocked_paths(args, demo)
    demo.launch(server_name=args.host, server_port=args.port, root_path=args.root_path or None,
                max_file_size=args.max_file_size, theme=THEME, css=CSS, footer_links=["api"],
                allowed_paths=[str(ROOT / "examples")], blocked_paths=blocked,
                show_error=True)


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
try:
    demo = create_demo(ARGS)
except WeightsError as exc:  # a refused or unusable weights file: the reason, not a traceback
    if __name__ != "__main__":
        raise
    log.error("cannot start: %s", exc)
    sys.exit(2)

if __name__ == "__main__":
    launch(demo, ARGS)
