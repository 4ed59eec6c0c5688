"""Command line: ``python -m sanet_viz analyze|weights|reproduce``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


COMPILE_HELP = ("torch.compile the probe's masked-forward models (inductor, frozen weights): on a 2-core CPU "
                "10-15%% faster probes after tens of seconds of compiling per precision, so it pays over "
                "many images only; on the CPU it needs a C++ compiler (g++)")


def _add_model_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    # suppress: for sub-commands of a parser that has the same options (``weights [show] --json``),
    # so that an option not given after the sub-command keeps the value given before it.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--resnet50", metavar="SPEC", default=default(None),
                   help="ResNet50 weights: path, URL, hf://owner/repo/file "
                   "or 'untrained' (default: $SANET_VIZ_RESNET50, weights/, torchvision's download)")
    p.add_argument("--sanet50", metavar="SPEC", default=default(None),
                   help="SANet50 weights: path, URL, hf://owner/repo/file "
                   "or 'untrained' (default: $SANET_VIZ_SANET50, then weights/sa_resnet50.pth.tar)")
    p.add_argument("--weights-dir", type=Path, default=default(None),
                   help="folder searched for weights files (default: weights/)")
    p.add_argument("--device", default=default("auto"), help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")
    p.add_argument("--require-pretrained", action="store_true", default=default(False),
                   help="fail instead of running a model with untrained weights")


def build_parser() -> argparse.ArgumentParser:
    from .cam import CAM_METHODS

    parser = argparse.ArgumentParser(prog="python -m sanet_viz",
                                     description="Interpretability lab for Shuffle Attention (SA-Net).")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="analyse images with ResNet50 and SANet50")
    a.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    a.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per image)")
    _add_model_args(a)
    a.add_argument("--method", default="gradcam", choices=list(CAM_METHODS))
    a.add_argument("--target-class", type=int, help="ImageNet index to explain in both models "
                   "(default: each model's top-1)")
    a.add_argument("--layer", help="CAM target layer: module name (layer3.5) or paper name (SA_4_6); "
                   "default layer4.2 = SA_5_3")
    a.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="probe precision; auto: bf16 where the hardware runs it natively, once a check on the "
                        "first image shows bf16 within 0.02 of fp32 with the group ranking kept (CAM is fp32)")
    a.add_argument("--no-probe", action="store_true", help="skip the 64-group probes")
    a.add_argument("--probe-batch-size", type=int, default=16)
    a.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    w = sub.add_parser("weights", help="where each model's weights come from; fetch; convert")
    _add_model_args(w)
    w.add_argument("--json", action="store_true", help="print the report as JSON (the table goes to stderr)")
    wsub = w.add_subparsers(dest="weights_command")
    for name, text in (("show", "sources, sha256 and pretrained status (default)"),
                       ("fetch", "download what can be downloaded")):
        wp = wsub.add_parser(name, help=text)
        _add_model_args(wp, suppress=True)
        wp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the report as JSON (the table goes to stderr)")
    cv = wsub.add_parser("convert", help="write a checkpoint as .safetensors (prefixes stripped)")
    cv.add_argument("source", type=Path)
    cv.add_argument("dest", type=Path)
    cv.add_argument("--model", choices=["resnet50", "sanet50"], help="check the keys against this model")
    w.set_defaults(weights_command="show")

    from .reproduce import add_reproduce_parser

    add_reproduce_parser(sub)
    return parser


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .analysis import AnalysisOptions, Lab, analyze
    from .export import write_result
    from .preprocessing import ImageDecodeError, load_and_prepare

    options = AnalysisOptions(method=args.method, target_class=args.target_class, cam_layer=args.layer,
                              precision=args.precision, probe=not args.no_probe,
                              probe_batch_size=args.probe_batch_size)
    lab = Lab.load(resnet50=args.resnet50, sanet50=args.sanet50, device=args.device,
                   weights_dir=args.weights_dir, require_pretrained=args.require_pretrained,
                   compile_probe=args.compile, log=lambda m: print(m, file=sys.stderr))
    for lm in lab.models.values():
        if not lm.weights.pretrained:
            _warn(f"{lm.display_name} runs UNTRAINED: {lm.weights.note}. Its results are not those "
                  "of the published model.")
    failures = 0
    used: set[str] = set()
    bar = tqdm(args.images, unit="image", disable=len(args.images) < 2, file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.name[:30])
        try:
            image = load_and_prepare(path, name=str(path))
        except ImageDecodeError as exc:
            tqdm.write(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = analyze(lab, image, options, name=path.name)
        stem = _unique_stem(path, used)
        data = write_result(result, args.out / stem)
        if len(args.images) < 2:
            for key, m in data["models"].items():  # type: ignore[union-attr]
                top = m["top5"][0]
                print(f"{path.name}: {m['display_name']}: {top['label']} ({top['prob']:.1%})")
    for lm in lab.models.values():
        if lm.bf16_check is not None:
            print(f"{lm.display_name}: {lm.bf16_check.describe()}", file=sys.stderr)
    if any(not lm.weights.pretrained for lm in lab.models.values()) and len(args.images) > failures:
        _warn(untrained_warning_for(lab))
    print(f"wrote {len(args.images) - failures} of {len(args.images)} image(s) to {args.out}", file=sys.stderr)
    return 1 if failures else 0


def untrained_warning_for(lab: object) -> str:
    names = [lm.display_name for lm in lab.models.values() if not lm.weights.pretrained]  # type: ignore[attr-defined]
    return f"results in this run come from UNTRAINED {' and '.join(names)} (see README, 'Weights')"


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem or "image"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}"
    used.add(candidate)
    return candidate


def cmd_weights(args: argparse.Namespace) -> int:
    from .weights import (MODEL_SPECS, WeightsError, fetch, load_state_dict_strict, read_state_dict,
                          resolve_source, save_safetensors, sha256_of)

    if args.weights_command == "convert":
        state = read_state_dict(args.source)
        if args.model:
            load_state_dict_strict(MODEL_SPECS[args.model].builder(), state, origin=str(args.source))
        save_safetensors(state, args.dest)
        print(f"wrote {args.dest} ({len(state)} tensors, sha256 {sha256_of(args.dest)})")
        return 0
    status = 0
    explicit = {"resnet50": getattr(args, "resnet50", None), "sanet50": getattr(args, "sanet50", None)}
    report = {}
    for key, spec in MODEL_SPECS.items():
        source = resolve_source(spec, explicit[key], weights_dir=getattr(args, "weights_dir", None))
        entry: dict[str, object] = {"kind": source.kind, "location": source.location, "why": source.reason}
        if args.weights_command == "fetch" and source.kind in {"url", "hf", "torchvision"}:
            try:
                path = fetch(source)
                entry.update(kind="path", location=str(path))
            except WeightsError as exc:
                _error(str(exc))
                status = 1
        if entry["kind"] == "path":
            path = Path(str(entry["location"]))
            entry["sha256"] = sha256_of(path) if path.is_file() else None
            entry["pretrained"] = path.is_file()
        else:
            entry["sha256"] = None
            entry["pretrained"] = entry["kind"] != "untrained"
            if source.kind == "untrained":
                entry["how_to_fix"] = source.reason
        report[key] = entry
        mark = "pretrained" if entry["pretrained"] else "UNTRAINED"
        print(f"{spec.display_name:9s} {mark:10s} {entry['kind']:11s} {entry['location']}"
              + (f"\n{'':32s}sha256 {entry['sha256']}" if entry.get("sha256") else "")
              + (f"\n{'':32s}{source.reason}" if source.kind == "untrained" else ""),
              file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    untrained = [MODEL_SPECS[k].display_name for k, e in report.items() if not e["pretrained"]]
    if getattr(args, "require_pretrained", False) and untrained:
        _error(f"no pretrained weights for {' and '.join(untrained)} (--require-pretrained)")
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .preprocessing import ImageDecodeError
    from .weights import WeightsError

    start = time.perf_counter()
    try:
        if args.command == "analyze":
            return cmd_analyze(args)
        if args.command == "weights":
            return cmd_weights(args)
        if args.command == "reproduce":
            from .reproduce import cmd_reproduce

            return cmd_reproduce(args)
    except (WeightsError, ImageDecodeError, ValueError, FileNotFoundError) as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error(f"interrupted after {time.perf_counter() - start:.0f} s")
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
