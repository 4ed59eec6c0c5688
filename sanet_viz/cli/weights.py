"""``python -m sanet_viz weights [show|fetch|convert]``: where each model's weights come from."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import add_model_args, error

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    w = sub.add_parser("weights", help="where each model's weights come from; fetch; convert")
    add_model_args(w)
    w.add_argument("--json", action="store_true", help="print the report as JSON (the table goes to stderr)")
    wsub = w.add_subparsers(dest="weights_command")
    for name, text in (("show", "sources, sha256 and pretrained status (default)"),
                       ("fetch", "download what can be downloaded")):
        wp = wsub.add_parser(name, help=text)
        add_model_args(wp, suppress=True)
        wp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the report as JSON (the table goes to stderr)")
    cv = wsub.add_parser("convert", help="write a checkpoint as .safetensors (prefixes stripped)")
    cv.add_argument("source", type=Path)
    cv.add_argument("dest", type=Path)
    from ..weights import MODEL_SPECS

    cv.add_argument("--model", choices=list(MODEL_SPECS), help="check the keys against this model")
    w.set_defaults(weights_command="show", run=run)
    return w


def run(args: argparse.Namespace) -> int:
    from ..weights import MODEL_SPECS, load_state_dict_strict, read_state_dict, save_safetensors, sha256_of

    if args.weights_command == "convert":
        state = read_state_dict(args.source)
        if args.model:
            load_state_dict_strict(MODEL_SPECS[args.model].build(), state, origin=str(args.source))
        save_safetensors(state, args.dest)
        print(f"wrote {args.dest} ({len(state)} tensors, sha256 {sha256_of(args.dest)})")
        return 0
    as_json = getattr(args, "json", False)
    status, report = 0, {}
    for key, spec in MODEL_SPECS.items():
        entry, ok = _report_entry(spec, getattr(args, key, None), getattr(args, "weights_dir", None),
                                  fetch_it=args.weights_command == "fetch")
        status = status or (0 if ok else 1)
        report[key] = entry
        mark = "pretrained" if entry["pretrained"] else "UNTRAINED"
        print(f"{spec.display_name:13s} {mark:10s} {entry['kind']:11s} {entry['location']}"
              + (f"\n{'':36s}sha256 {entry['sha256']}" if entry.get("sha256") else "")
              + (f"\n{'':36s}{entry['how_to_fix']}" if "how_to_fix" in entry else ""),
              file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(report, indent=2))
    untrained = [MODEL_SPECS[k].display_name for k, e in report.items() if not e["pretrained"]]
    if getattr(args, "require_pretrained", False) and untrained:
        error(f"no pretrained weights for {' and '.join(untrained)} (--require-pretrained)")
        status = 1
    return status


def _report_entry(spec: Any, explicit: str | None, weights_dir: Path | None, *,
                  fetch_it: bool) -> tuple[dict[str, object], bool]:
    """One model's line of the report: where its weights come from, and whether a fetch worked."""
    from ..weights import WeightsError, fetch, resolve_source, sha256_of

    source = resolve_source(spec, explicit, weights_dir=weights_dir)
    entry: dict[str, object] = {"kind": source.kind, "location": source.location, "why": source.reason}
    ok = True
    if fetch_it and source.kind in {"url", "hf", "torchvision"}:
        try:
            entry.update(kind="path", location=str(fetch(source)))
        except WeightsError as exc:
            error(str(exc))
            ok = False
    if entry["kind"] == "path":
        path = Path(str(entry["location"]))
        entry["sha256"] = sha256_of(path) if path.is_file() else None
        entry["pretrained"] = path.is_file()
    else:
        entry["sha256"] = None
        entry["pretrained"] = entry["kind"] != "untrained"
        if source.kind == "untrained":
            entry["how_to_fix"] = source.reason
    return entry, ok
