"""Starting the app: load the models once, warm them up, build the page, and serve it."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from ..analysis import AnalysisOptions, analyze
from ..lab import Lab, LoadedModel, load_model
from ..preprocessing import DecodeLimits
from ..ui import CSS, THEME, AppSettings, build_demo
from ..ui.pool import Expected, ModelPool
from ..weights import MODEL_SPECS, WeightsError, default_weights_dir, parse_model_keys, resolve_source
from . import shutdown
from .env import gradio_temp_dir
from .janitor import CacheJanitor
from .memory import MemoryReleaser, release_memory
from .shutdown import GracefulStop
from .stats import engine_stats

__all__ = ["create_demo", "launch", "warm_up", "check_paths", "model_pool", "WARM_UP_IMAGE", "ROOT"]

ROOT = Path(__file__).resolve().parent.parent.parent
WARM_UP_IMAGE = ROOT / "examples" / "chelsea.jpg"
log = logging.getLogger("sanet-viz")


def _weights_dir(args: argparse.Namespace) -> Path:
    return Path(args.weights_dir) if args.weights_dir else default_weights_dir()


def check_paths(args: argparse.Namespace) -> None:
    """Refuse a Gradio temp folder that would make the app's own files servable."""
    temp = gradio_temp_dir().resolve()
    for private in (ROOT, _weights_dir(args).resolve()):
        if temp == private or temp in private.parents:  # everything under the temp folder is served
            raise SystemExit(f"GRADIO_TEMP_DIR={temp} would serve {private} to visitors; choose another folder")


def warm_up(lab: Lab, image_path: Path = WARM_UP_IMAGE, *, precision: str = "auto") -> None:
    """One full analysis before the first visitor.

    First-call costs (allocations, oneDNN kernel choices, the bf16 copies) are paid here, and
    ``auto`` precision's bf16 check runs on a fixed picture: every visitor's probe then runs in the
    same precision, so the same image always gets the same scores.
    """
    if not image_path.is_file():
        log.warning("warm-up skipped: %s is missing; the first visitor pays the first-call costs", image_path)
        return
    start = time.perf_counter()
    analyze(lab, lab.prepare(image_path), AnalysisOptions(precision=precision), name=image_path.name)
    for lm in lab.models.values():
        if precision != "auto":
            log.info("%s: probes run in %s (--precision)", lm.display_name, precision)
        else:
            log.info("%s: %s", lm.display_name, lm.bf16_check.describe() if lm.bf16_check else "probes run in fp32")
    log.info("warm-up analysis done in %.1f s", time.perf_counter() - start)


def _expected(key: str, explicit: str | None, args: argparse.Namespace) -> Expected:
    """What an offered model not loaded yet will run with, from where its weights would come
    (:func:`weights.resolve_source`: reads and downloads nothing)."""
    source = resolve_source(MODEL_SPECS[key], explicit, weights_dir=args.weights_dir)
    if source.kind == "untrained":
        return Expected(False, source.reason)
    return Expected(True, f"{source.location} ({source.reason})")


def model_pool(args: argparse.Namespace) -> ModelPool:
    """The models of ``--models``: the first two loaded now and warmed up, the others loaded (and
    warmed up on the same picture) when a visitor first picks one."""
    try:
        offered = parse_model_keys(args.models)
    except ValueError as exc:
        raise SystemExit(f"--models: {exc}") from None
    if len(offered) < 2:
        raise SystemExit(f"--models: name at least two models (the pair a visitor starts with), got {args.models}")
    specs = {key: getattr(args, key, None) for key in MODEL_SPECS}
    lab = Lab.load(models=offered[:2], specs=specs, device=args.device, weights_dir=args.weights_dir,
                   require_pretrained=args.require_pretrained, log=log.info)
    warm_up(lab, precision=args.precision)
    expected = {key: _expected(key, specs[key], args) for key in offered[2:]}
    for key, e in expected.items():
        if args.require_pretrained and not e.pretrained:  # fail at start, not at a visitor's first pick
            raise WeightsError(f"{MODEL_SPECS[key].display_name}: {e.note} (--require-pretrained; or leave it "
                               "out of --models)")
        log.info("%s: offered, loads on first use; weights: %s", MODEL_SPECS[key].display_name,
                 e.note if e.pretrained else f"UNTRAINED ({e.note})")

    device = lab.device  # not the lab itself: a loader that held it would keep the starting pair alive

    def loader(key: str) -> LoadedModel:
        lm = load_model(key, specs[key], device=device, weights_dir=args.weights_dir,
                        require_pretrained=args.require_pretrained, log=log.info)
        warm_up(Lab({key: lm}), precision=args.precision)  # its precision check on the same picture as the others'
        return lm

    return ModelPool(offered, lab.models, loader=loader, expected=expected, max_loaded=args.max_loaded_models,
                     release=release_memory)


def create_demo(args: argparse.Namespace) -> gr.Blocks:
    """Load the starting pair once (progress in the log) and build the Blocks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_paths(args)
    pool = model_pool(args)
    profiles = None
    if args.profiles:
        from ..profiles import load_profiles

        profiles = load_profiles(args.profiles)
        log.info("profiles: %d classes from %d images (%s)", len(profiles.classes), profiles.images, args.profiles)
    settings = AppSettings(limits=DecodeLimits(max_pixels=args.max_pixels, max_bytes=args.max_file_size),
                           cache_ttl_s=args.cache_ttl, output_ttl_s=args.cache_ttl,
                           concurrency=args.concurrency, profiles=profiles, stopping=shutdown.stopping,
                           precision=args.precision)
    demo = build_demo(pool, settings)
    if os.environ.get("SANET_VIZ_DEBUG_STATS", "") in {"1", "true"}:
        log.warning("SANET_VIZ_DEBUG_STATS: /debug_stats shows hook counts and memory; not for public servers")

        def debug_stats() -> dict[str, Any]:
            return engine_stats(Lab(pool.models))  # every model loaded so far

        with demo:
            gr.api(debug_stats, api_name="debug_stats", concurrency_limit=None, api_visibility="undocumented")
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    # Weights files to refuse if they lie in a served folder: those loaded, and those the others will load.
    files = [lm.weights.source for lm in pool.models.values() if lm.weights.pretrained]
    files += [resolve_source(MODEL_SPECS[k], getattr(args, k, None), weights_dir=args.weights_dir).location
              for k in pool.offered if not pool.loaded(k)]
    demo.weight_files = [f for f in files if Path(f).is_file()]  # type: ignore[attr-defined]
    return demo


def _blocked_paths(args: argparse.Namespace, demo: gr.Blocks) -> list[str]:
    """Weights that lie inside a folder the app serves, to be refused there too.

    Only those: Gradio lists every blocked path in the error it returns for a refused path, and
    weights outside the served folders are refused anyway, without telling anyone where they are.
    """
    examples_cache = Path(os.environ.get("GRADIO_EXAMPLES_CACHE", ".gradio/cached_examples"))
    served = [s.resolve() for s in (ROOT / "examples", gradio_temp_dir(), examples_cache)]
    weights = [_weights_dir(args), *map(Path, getattr(demo, "weight_files", []))]
    return [str(w) for w in weights if any(w.resolve() == s or s in w.resolve().parents for s in served)]


def launch(demo: gr.Blocks, args: argparse.Namespace) -> None:
    """Serve ``demo`` until SIGTERM (then stop cleanly; see :class:`GracefulStop`)."""
    GracefulStop(demo, args.shutdown_grace).install()
    MemoryReleaser(demo).start()
    janitor = CacheJanitor(demo, Path(get_upload_folder()), args.cache_ttl,
                           every_s=max(1, min(1800, args.cache_ttl // 2)))
    janitor.sweep()  # what earlier runs left behind
    janitor.start()
    demo.launch(server_name=args.host, server_port=args.port, root_path=args.root_path or None,
                max_file_size=args.max_file_size, theme=THEME, css=CSS, footer_links=["api"],
                allowed_paths=[str(ROOT / "examples")], blocked_paths=_blocked_paths(args, demo),
                show_error=True)
