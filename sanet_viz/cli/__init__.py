"""Command line: ``python -m sanet_viz analyze|figure|weights|reproduce``.

One module per sub-command (``add_parser`` and ``run``), the shared model arguments in
``common``. Building the parser imports argparse only; each command imports what it needs when it
runs, so ``weights --help`` loads neither the models nor the data-set machinery.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from . import analyze, figure, reproduce, weights
from .common import error, usage_error

__all__ = ["main", "build_parser"]

COMMANDS = (analyze, figure, weights, reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sanet_viz",
                                     description="Interpretability lab for Shuffle Attention (SA-Net).")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        error(f"interrupted after {time.perf_counter() - start:.0f} s")
        return 130
    except Exception as exc:
        if not usage_error(exc):
            raise  # a bug: the traceback, exit status 1
        error(str(exc))
        return 2
