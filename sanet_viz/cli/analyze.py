"""``python -m sanet_viz analyze IMAGE ... --out DIR``: result.json, CAMs and pictures per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import COMPILE_HELP, add_model_args, error, warn

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from ..cam import CAM_METHODS

    a = sub.add_parser("analyze", help="analyse images with ResNet50 and SANet50")
    a.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    a.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per image)")
    add_model_args(a)
    a.add_argument("--method", default="gradcam", choices=list(CAM_METHODS))
    a.add_argument("--target-class", type=int, help="ImageNet index to explain in both models "
                   "(default: each model's top-1)")
    a.add_argument("--layer", help="CAM target layer: module name (layer3.5) or paper name (SA_4_6); "
                   "default layer4.2 = SA_5_3")
    a.add_argument("--precision", default="auto", choices=["auto", "fp32", "mixed", "bf16"],
                   help="probe precision; auto: bf16 where the hardware runs it natively, once a check on the "
                        "first image shows bf16 within 0.02 of fp32 with the group ranking kept, else mixed "
                        "(bf16 in layer3-layer4 only) if that passes the same check, else fp32 (CAM is fp32)")
    a.add_argument("--no-probe", action="store_true", help="skip the 64-group probes")
    a.add_argument("--probe-batch-size", type=int, default=16)
    a.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    a.set_defaults(run=run)
    return a


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..analysis import AnalysisOptions, analyze
    from ..export import BackgroundWriter
    from ..lab import Lab
    from ..preprocessing import ImageDecodeError
    from ..weights import MODEL_SPECS, untrained_warning

    # Options first: a wrong one fails before the models load.
    options = AnalysisOptions(method=args.method, target_class=args.target_class, cam_layer=args.layer,
                              precision=args.precision, probe=not args.no_probe,
                              probe_batch_size=args.probe_batch_size,
                              num_classes=min(spec.num_classes for spec in MODEL_SPECS.values()))
    lab = Lab.load(resnet50=args.resnet50, sanet50=args.sanet50, device=args.device,
                   weights_dir=args.weights_dir, require_pretrained=args.require_pretrained,
                   compile_probe=args.compile, log=lambda m: print(m, file=sys.stderr))
    for lm in lab.models.values():
        if not lm.weights.pretrained:
            warn(f"{untrained_warning([lm.display_name])} ({lm.weights.note})")
    failures = 0
    used: set[str] = set()
    bar = tqdm(args.images, unit="image", disable=len(args.images) < 2, file=sys.stderr)
    # Pictures and files of one image are written while the next image's forwards run.
    with BackgroundWriter() as writer:
        for path in bar:
            bar.set_postfix_str(path.name[:30])
            try:
                image = lab.prepare(path, name=str(path))
            except ImageDecodeError as exc:
                tqdm.write(f"error: {exc}", file=sys.stderr)
                failures += 1
                continue
            result = analyze(lab, image, options, name=path.name)
            writer.submit(result, args.out / _unique_stem(path, used))
            if len(args.images) < 2:
                for m in result.models.values():
                    top = m.top5[0]
                    print(f"{path.name}: {m.display_name}: {top.label} ({top.prob:.1%})")
    for lm in lab.models.values():
        if lm.bf16_check is not None:
            print(f"{lm.display_name}: {lm.bf16_check.describe()}", file=sys.stderr)
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
