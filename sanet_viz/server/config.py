"""The app's command line: the CLI's model arguments, the limits table, and server options.

Every flag has an environment variable of the same meaning (what a container or a Space sets).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..cli.common import add_model_args, add_models_arg, add_precision_arg
from ..limits import LIMITS

__all__ = ["parse_args", "add_limit_args"]


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """One flag per limit of :data:`limits.LIMITS` that has one, defaulting to its variable."""
    for name, limit in LIMITS.items():
        if limit.flag:
            p.add_argument(limit.flag, dest=name, type=limit.parse, default=limit.value(),
                           help=f"{limit.help} (${limit.env}; default {limit.default})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="sanet-viz: ResNet50 vs SANet50 (and SE, ECA) in the browser")
    p.add_argument("--host", default=env("SANET_VIZ_HOST", "127.0.0.1"),
                   help="interface to listen on; 0.0.0.0 in containers ($SANET_VIZ_HOST)")
    p.add_argument("--port", type=int, default=int(env("SANET_VIZ_PORT", env("PORT", "7860"))),
                   help="port ($SANET_VIZ_PORT)")
    add_model_args(p)
    from ..weights import MODEL_SPECS

    add_models_arg(p, what="the models the app offers, in order; the first two are the pair a visitor starts with "
                   "(loaded at start), the others load when a visitor first picks one; name two for exactly "
                   "that comparison", default=tuple(MODEL_SPECS))
    add_precision_arg(p, of="of the probe's masked forwards; fp32 skips auto's check at start-up")
    add_limit_args(p)
    p.add_argument("--profiles", type=Path, default=env("SANET_VIZ_PROFILES") or None,
                   help="profiles.npz from `python -m sanet_viz reproduce`: show each image's nearest "
                        "classes by SA profile ($SANET_VIZ_PROFILES)")
    p.add_argument("--root-path", default=env("SANET_VIZ_ROOT_PATH", env("GRADIO_ROOT_PATH")),
                   help="URL prefix when served behind a proxy, e.g. /sanet ($SANET_VIZ_ROOT_PATH)")
    return p.parse_args(argv)
