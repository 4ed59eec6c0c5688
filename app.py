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
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sanet_viz.analysis import Lab  # noqa: E402
from sanet_viz.preprocessing import DecodeLimits  # noqa: E402
from sanet_viz.ui import CSS, THEME, AppSettings, build_demo  # noqa: E402

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
    p.add_argument("--max-file-size", default=env("SANET_VIZ_MAX_FILE_SIZE", "20mb"),
                   help="largest upload, e.g. 20mb ($SANET_VIZ_MAX_FILE_SIZE)")
    p.add_argument("--max-pixels", type=int, default=int(env("SANET_VIZ_MAX_PIXELS", "50000000")),
                   help="largest decoded image in pixels ($SANET_VIZ_MAX_PIXELS)")
    p.add_argument("--queue-size", type=int, default=int(env("SANET_VIZ_QUEUE_SIZE", "32")),
                   help="requests that may wait before new ones are refused ($SANET_VIZ_QUEUE_SIZE)")
    p.add_argument("--root-path", default=env("SANET_VIZ_ROOT_PATH", env("GRADIO_ROOT_PATH")),
                   help="URL prefix when served behind a proxy, e.g. /sanet ($SANET_VIZ_ROOT_PATH)")
    p.add_argument("--require-pretrained", action="store_true",
                   default=env("SANET_VIZ_REQUIRE_PRETRAINED", "") in {"1", "true"},
                   help="refuse to start with untrained models ($SANET_VIZ_REQUIRE_PRETRAINED=1)")
    return p.parse_args(argv)


def _size_in_bytes(text: str) -> int:
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def create_demo(args: argparse.Namespace) -> gr.Blocks:
    """Load both models once (progress in the log) and build the Blocks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lab = Lab.load(resnet50=args.resnet50, sanet50=args.sanet50, device=args.device,
                   weights_dir=args.weights_dir, require_pretrained=args.require_pretrained, log=log.info)
    limits = DecodeLimits(max_pixels=args.max_pixels, max_bytes=_size_in_bytes(args.max_file_size))
    demo = build_demo(lab, AppSettings(limits=limits))
    demo.queue(max_size=args.queue_size, default_concurrency_limit=2)
    return demo


def launch(demo: gr.Blocks, args: argparse.Namespace) -> None:
    def stop(signum: int, frame: object) -> None:  # graceful stop: finish the response, close the server
        log.info("signal %s: shutting down", signum)
        demo.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    demo.launch(server_name=args.host, server_port=args.port, root_path=args.root_path or None,
                max_file_size=args.max_file_size, theme=THEME, css=CSS, footer_links=["api"],
                allowed_paths=[str(ROOT / "examples")], blocked_paths=[str(args.weights_dir)],
                show_error=True)


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
demo = create_demo(ARGS)

if __name__ == "__main__":
    launch(demo, ARGS)
