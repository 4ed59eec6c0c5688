"""``python -m sanet_viz figure IMAGE ... --out FILE``: a paper-style comparison figure (PDF, SVG, PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import add_cam_args, add_model_args, add_models_arg, error, load_lab, model_keys, prepared_images, warn

__all__ = ["add_parser", "run"]

# Kept here as well as in figures.py so that --help imports no matplotlib or torch.
_FORMATS = (".pdf", ".svg", ".png")
_COLUMNS_HELP = ("comma-separated columns from input, the --models (or any registered model's key), difference "
                 "(default: input and the two --models; difference = the second model's map minus the first's)")


def add_parser(sub: Any) -> argparse.ArgumentParser:

    f = sub.add_parser("figure", help="one comparison figure of several images (rows) for slides and papers",
                       description="Rows are images; columns the input (the 224x224 centre crop the models "
                                   "see) and each model's CAM, titled with the class it explains and its "
                                   "probability, on one colour scale. Text in PDF and SVG stays text.")
    f.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    f.add_argument("--out", type=Path, required=True, help="output file: .pdf, .svg or .png")
    f.add_argument("--columns", help=_COLUMNS_HELP)
    f.add_argument("--layout", default="slide", choices=["slide", "page"],
                   help="slide: a 16:9 slide (13.33 x 7.5 in); page: an A4 text block (170 x 240 mm)")
    f.add_argument("--dpi", type=int, default=200, help="resolution of PNG output (default 200)")
    f.add_argument("--opacity", type=float, default=0.5, help="of the maps over the image (0-1, default 0.5)")
    add_models_arg(f, what="the two models whose maps the figure compares")
    add_model_args(f)
    add_cam_args(f)
    f.set_defaults(run=run)
    return f


def _check_args(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() not in _FORMATS:
        raise ValueError(f"--out must end in {', '.join(_FORMATS)}, got {args.out.name!r}")
    if args.dpi < 10 or args.dpi > 2400:
        raise ValueError(f"--dpi must be within 10..2400, got {args.dpi}")
    if not 0.0 <= args.opacity <= 1.0:
        raise ValueError("--opacity must be within [0, 1]")


def run(args: argparse.Namespace) -> int:
    _check_args(args)  # options first: a wrong one fails before anything heavy is imported or loaded
    from .. import figures
    from ..analysis import AnalysisOptions
    from ..weights import MODEL_SPECS, untrained_warning

    pair = model_keys(args)
    columns = figures.parse_columns(args.columns or ("input", *pair))
    needed = figures.models_for(columns, pair)
    limit = figures.max_images(columns=columns, layout=args.layout, pair=pair)
    if len(args.images) > limit:
        raise ValueError(f"{len(args.images)} images: one {args.layout} figure of {len(columns)} columns holds at "
                         f"most {limit} legibly; make several figures")
    options = AnalysisOptions(method=args.method, target_class=args.target_class, cam_layer=args.layer,
                              probe=False, gates=False,
                              num_classes=min(MODEL_SPECS[key].num_classes for key in needed))
    lab = load_lab(args, models=needed)  # only what the columns show, the pair first in its order
    failed: list[Path] = []
    results = [figures.explain_for_figure(lab, image, options, name=path.name, columns=columns)
               for path, image in prepared_images(lab, args.images, failed)]
    if not results:
        error("no image could be analysed")
        return 1
    fig = figures.comparison_figure(results, columns=columns, layout=args.layout, opacity=args.opacity)
    figures.save_figure(fig, args.out, dpi=args.dpi)
    if lab.untrained:
        warn(untrained_warning(lab.untrained, subject="the maps in this figure"))
    print(f"wrote {args.out} ({len(results)} of {len(args.images)} image(s), {args.layout} layout)",
          file=sys.stderr)
    return 1 if failed else 0
