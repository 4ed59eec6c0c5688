"""``python -m sanet_viz analyze IMAGE ... --out DIR``: result.json, CAMs and pictures per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import (
    COMPILE_HELP,
    add_cam_args,
    add_faithfulness_args,
    add_model_args,
    add_models_arg,
    add_precision_arg,
    error,
    load_lab,
    model_keys,
    prepared_images,
    warn,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:

    a = sub.add_parser("analyze", help="analyse images with two models (default ResNet50 and SANet50)")
    a.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    a.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per image)")
    add_models_arg(a)
    add_model_args(a)
    add_cam_args(a)
    add_precision_arg(a, of="probe precision (CAM is fp32)")
    a.add_argument("--no-probe", action="store_true", help="skip the 64-group probes")
    a.add_argument("--probe-batch-size", type=int, default=16)
    a.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_faithfulness_args(a, randomization=True)
    a.set_defaults(run=run)
    return a


def run(args: argparse.Namespace) -> int:
    from ..analysis import AnalysisOptions, analyze, faithfulness_verdict
    from ..export import BackgroundWriter
    from ..weights import MODEL_SPECS, untrained_warning

    # Options first: a wrong one fails before the models load.
    options = AnalysisOptions(method=args.method, target_class=args.target_class, cam_layer=args.layer,
                              precision=args.precision, probe=not args.no_probe,
                              probe_batch_size=args.probe_batch_size,
                              faithfulness=args.faithfulness or args.faithfulness_randomization,
                              faithfulness_steps=args.faithfulness_steps,
                              faithfulness_randomization=args.faithfulness_randomization,
                              num_classes=min(MODEL_SPECS[key].num_classes for key in model_keys(args)))
    lab = load_lab(args, compile_probe=args.compile)
    failed: list[Path] = []
    used: set[str] = set()
    # Pictures and files of one image are written while the next image's forwards run.
    with BackgroundWriter() as writer:
        for path, image in prepared_images(lab, args.images, failed):
            result = analyze(lab, image, options, name=path.name)
            writer.submit(result, args.out / _unique_stem(path, used))
            if len(args.images) < 2:
                for m in result.models.values():
                    top = m.top5[0]
                    print(f"{path.name}: {m.display_name}: {top.label} ({top.prob:.1%})")
                if (sentence := faithfulness_verdict(result)) is not None:
                    print(f"{path.name}: faithfulness: {sentence}")
    for lm in lab.models.values():
        if lm.bf16_check is not None:
            print(f"{lm.display_name}: {lm.bf16_check.describe()}", file=sys.stderr)
    failures = len(failed)
    if lab.untrained and len(args.images) > failures:
        warn(untrained_warning(lab.untrained, subject="results in this run"))
    print(f"wrote {len(args.images) - failures} of {len(args.images)} image(s) to {args.out}", file=sys.stderr)
    if failures == len(args.images):
        error("no image could be analysed")
    return 1 if failures else 0


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem or "image"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}"
    used.add(candidate)
    return candidate
