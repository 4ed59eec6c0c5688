"""What every front end shares: the model arguments (flags with environment variables), the
``--compile`` help, and one way to print warnings and errors. Imports nothing heavy."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..lab import Lab
    from ..preprocessing import PreparedImage

__all__ = ["add_model_args", "add_models_arg", "model_keys", "add_precision_arg", "PRECISIONS",
           "COMPILE_HELP", "warn", "error", "env_flag", "load_lab", "prepared_images",
           "usage_error", "add_faithfulness_args"]

AUTO_PRECISION_HELP = ("auto: per model, bf16 where the hardware runs it natively, once a check on the first image "
                       "shows bf16 within 0.02 of fp32 with the group ranking kept and at most 0.9x fp32's time; else "
                       "mixed (bf16 in layer3-layer4 only) if it passes the same check; else fp32")
PRECISIONS = ("auto", "fp32", "mixed", "bf16")
COMPILE_HELP = ("torch.compile the probe's masked-forward models (inductor, frozen weights): on a 2-core CPU "
                "10-15%% faster probes after tens of seconds of compiling per precision, so it pays over "
                "many images only; on the CPU it needs a C++ compiler (g++)")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def add_cam_args(p: argparse.ArgumentParser) -> None:
    """--method, --target-class and --layer: what a CAM explains, and where."""
    from ..cam import CAM_METHODS

    p.add_argument("--method", default="gradcam", choices=list(CAM_METHODS))
    p.add_argument("--target-class", type=int, help="ImageNet index to explain in both models "
                   "(default: each model's top-1)")
    p.add_argument("--layer", help="CAM target layer: module name (layer3.5) or paper name (SA_4_6); "
                   "default layer4.2 = SA_5_3")


def add_model_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """One --KEY SPEC per registered model (--resnet50, --sanet50, --seresnet50, ...), --weights-dir,
    --device, --require-pretrained.

    Unset SPECs fall back to each model's variable ($SANET_VIZ_RESNET50, ...) and the weights folder
    when the models are loaded (weights.resolve_source); --device and --require-pretrained read
    $SANET_VIZ_DEVICE and $SANET_VIZ_REQUIRE_PRETRAINED. ``suppress``: for sub-commands of a parser
    that has the same options (``weights [show] --json``), so that an option not given after the
    sub-command keeps the value given before it.
    """
    from ..weights import MODEL_SPECS  # the registry (imports torch, not the models' machinery)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    for key, spec in MODEL_SPECS.items():
        download = {"hf": ", its Hugging Face download", "ht": ", torchvision's download"}.get(
            (spec.weights.url or "")[:2], "")
        p.add_argument(f"--{key}", metavar="SPEC", default=default(None),
                       help=f"{spec.display_name} weights: path, URL, hf://owner/repo/file or 'untrained' "
                            f"(default: ${spec.env_var}, then weights/{spec.weights.filenames[0]}{download})")
    p.add_argument("--weights-dir", type=Path, default=default(None),
                   help="folder searched for weights files (default: $SANET_VIZ_WEIGHTS_DIR or weights/)")
    p.add_argument("--device", default=default(os.environ.get("SANET_VIZ_DEVICE") or "auto"),
                   help="auto (GPU when there is one), cpu, cuda, cuda:1 ... ($SANET_VIZ_DEVICE)")
    p.add_argument("--require-pretrained", action="store_true",
                   default=default(env_flag("SANET_VIZ_REQUIRE_PRETRAINED")),
                   help="fail instead of running a model with untrained weights ($SANET_VIZ_REQUIRE_PRETRAINED=1)")


def add_models_arg(p: argparse.ArgumentParser, *, what: str = "the two models to compare",
                   default: Sequence[str] | None = None) -> None:
    """--models KEY,KEY: registered models by key, in order ($SANET_VIZ_MODELS; default ``default``,
    else resnet50,sanet50)."""
    from ..weights import DEFAULT_MODELS, MODEL_SPECS

    default = os.environ.get("SANET_VIZ_MODELS", "").strip() or ",".join(default or DEFAULT_MODELS)
    p.add_argument("--models", default=default, metavar="KEY,KEY",
                   help=f"{what}, from {', '.join(MODEL_SPECS)} ($SANET_VIZ_MODELS; default {default})")


def add_precision_arg(p: argparse.ArgumentParser, *, of: str) -> None:
    """--precision {auto,fp32,mixed,bf16} of ``of``, defaulting to $SANET_VIZ_PRECISION, else auto."""
    default = os.environ.get("SANET_VIZ_PRECISION", "").strip().lower() or "auto"
    if default not in PRECISIONS:
        raise SystemExit(f"$SANET_VIZ_PRECISION must be one of {', '.join(PRECISIONS)}, got {default!r}")
    p.add_argument("--precision", default=default, choices=list(PRECISIONS),
                   help=f"{of}; {AUTO_PRECISION_HELP} ($SANET_VIZ_PRECISION; default {default})")


def add_faithfulness_args(p: argparse.ArgumentParser, *, randomization: bool) -> None:
    """--faithfulness, --faithfulness-steps S and (per image only) --faithfulness-randomization."""
    p.add_argument("--faithfulness", action="store_true",
                   help="measure each CAM's deletion and insertion curves and ROAD: 2(S+1) + 8 forwards and 8 "
                        "imputations per image and model (README, 'Faithfulness')")
    p.add_argument("--faithfulness-steps", type=int, default=32, metavar="S",
                   help="steps S of the deletion and insertion curves (default 32)")
    if randomization:
        p.add_argument("--faithfulness-randomization", action="store_true",
                       help="also the cascading randomisation sanity check: one CAM per block, on a copy of "
                            "each model (implies --faithfulness)")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def model_keys(args: argparse.Namespace, *, exactly: int | None = 2) -> tuple[str, ...]:
    """The checked keys of --models (:func:`add_models_arg`); the default pair without the flag."""
    from ..weights import DEFAULT_MODELS, parse_model_keys

    return parse_model_keys(getattr(args, "models", None) or DEFAULT_MODELS, exactly=exactly)


def load_lab(args: argparse.Namespace, *, compile_probe: bool = False, exactly: int | None = 2,
             models: Sequence[str] | None = None) -> Lab:
    """The --models (default ResNet50 and SANet50), or ``models`` when given, with the model
    arguments (:func:`add_model_args`), with a warning per untrained one."""
    from ..lab import Lab
    from ..weights import MODEL_SPECS, untrained_warning

    lab = Lab.load(models=models or model_keys(args, exactly=exactly),
                   specs={key: getattr(args, key, None) for key in MODEL_SPECS}, device=args.device,
                   weights_dir=args.weights_dir, require_pretrained=args.require_pretrained,
                   compile_probe=compile_probe, log=lambda m: print(m, file=sys.stderr))
    for lm in lab.models.values():
        if not lm.weights.pretrained:
            warn(f"{untrained_warning([lm.display_name])} ({lm.weights.note})")
    return lab


def prepared_images(lab: Lab, paths: Sequence[Path], failed: list[Path]) -> Iterator[tuple[Path, PreparedImage]]:
    """Each path decoded and prepared, under a progress bar when there are several.

    A file that is not a picture gets a one-line error naming it, is appended to ``failed`` and
    skipped; the others go on.
    """
    from tqdm import tqdm

    from ..preprocessing import ImageDecodeError

    bar = tqdm(paths, unit="image", disable=len(paths) < 2, file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.name[:30])
        try:
            image = lab.prepare(path, name=str(path))
        except ImageDecodeError as exc:
            hint = f" (this limit is set by ${exc.setting})" if exc.setting else ""
            tqdm.write(f"error: {exc}{hint}", file=sys.stderr)
            failed.append(path)
            continue
        yield path, image


def usage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a problem with what the user gave (weights, pictures, arguments, files):
    a one-line message and exit status 2, not a traceback."""
    from ..preprocessing import ImageDecodeError
    from ..weights import WeightsError

    return isinstance(exc, (WeightsError, ImageDecodeError, ValueError, FileNotFoundError))
