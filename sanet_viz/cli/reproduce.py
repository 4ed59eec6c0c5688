"""``python -m sanet_viz reproduce``: the paper's group analysis over a labelled image folder.

Only argparse here at import: the engine (``sanet_viz.reproduce``: data loading, torch.distributed
collectives) is imported when the command runs, not when another command's ``--help`` is shown.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from .common import (
    COMPILE_HELP,
    add_faithfulness_args,
    add_model_args,
    add_models_arg,
    add_precision_arg,
    error,
    model_keys,
    usage_error,
    warn,
)

__all__ = ["add_parser", "run", "exit_status"]

# A run's outcome, from best to worst: under torchrun every rank reports its own, and all of them
# exit with the worst (reproduce.distributed.finish), after rank 0 has written the outputs.
DONE, UNDECODABLE, FAILED, CRASHED = 0, 1, 2, 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce", help="the paper's group analysis over a labelled image folder (1 GPU or torchrun)",
        description="Per model (any registered: --models): top-1 accuracy, per-group top-1 of the SA_5_3 probe; "
                    "for every model with attention gates (SANet50's SA per group, SE-ResNet50's SE and "
                    "ECA-ResNet50d's ECA per channel) per-class gate profiles and their class correlation at "
                    "every depth, and all of them on one axis of depth. Each model gets its own preprocessing "
                    "of the same crop. Launch with torchrun for several GPUs or machines. Rerunning the same "
                    "command continues an interrupted run.")
    p.add_argument("--data", type=Path, required=True,
                   help="ImageFolder (one folder per class: class indices, or WordNet ids with --classes or "
                        "all 1000 present), or a flat folder with --labels")
    p.add_argument("--out", type=Path, required=True, help="output folder (state/ inside keeps partial sums)")
    p.add_argument("--classes", metavar="FILE", help="folder/label name -> class index: the ImageNet devkit "
                   "archive or meta.mat, LOC_synset_mapping.txt, imagenet_class_index.json, or 'NAME INDEX' lines")
    p.add_argument("--labels", metavar="FILE", help="labels of a flat folder: 'FILENAME INDEX' lines, the "
                   "devkit's ground truth (with the devkit) or the devkit archive, LOC_val_solution.csv")
    p.add_argument("--limit", type=int, help="use N images, taken round-robin over classes")
    p.add_argument("--batch-size", type=int, help="images per batch (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--probe-batch-size", type=int,
                   help="masked inputs per forward (default 256 on a GPU, 32 on the CPU)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default 4 on a GPU, 1 on the CPU)")
    add_precision_arg(p, of="of the 64 masked forwards (the unmasked forward: top-1, gates, is always fp32)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_models_arg(p, what="the models to evaluate (one or more)")
    p.add_argument("--no-probe", action="store_true", help="skip the group probe (top-1 and gate profiles only)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between saved partial sums")
    p.add_argument("--fresh", action="store_true", help="discard saved partial sums and start over")
    p.add_argument("--figure-classes", help="comma-separated class indices for the correlation-matrix figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_faithfulness_args(p, randomization=False)
    p.add_argument("--faithfulness-method", default="gradcam", help="CAM method measured (default gradcam)")
    p.add_argument("--faithfulness-layer", help="CAM layer measured (default: the probe layer, layer4.2 = SA_5_3)")
    add_model_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``python -m sanet_viz reproduce``; the exit status is :func:`exit_status` of the run's outcome,
    the same on every rank under torchrun."""
    import torch
    import torch.distributed as dist

    from ..lab import Lab
    from ..reproduce import ReproduceOptions, init_distributed, scan_dataset, select_balanced, write_outputs
    from ..reproduce import run as run_reproduce
    from ..weights import MODEL_SPECS, untrained_warning

    rank, world, device_name = init_distributed(args.device)
    log = (lambda m: print(m, file=sys.stderr)) if rank == 0 else None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:  # torchrun and schedulers stop workers with SIGTERM
        raise KeyboardInterrupt

    if threading_main():
        signal.signal(signal.SIGTERM, on_term)
    try:
        wanted = model_keys(args, exactly=None)
        figure_classes = [int(c) for c in args.figure_classes.split(",")] if args.figure_classes else None
        scanned = scan_dataset(args.data, classes_file=args.classes, labels_file=args.labels,
                               num_classes=min(MODEL_SPECS[k].num_classes for k in wanted))
        samples = select_balanced(scanned.samples, args.limit)
        lab = Lab.load(models=wanted, specs={key: getattr(args, key, None) for key in MODEL_SPECS},
                       device=device_name, weights_dir=args.weights_dir, require_pretrained=args.require_pretrained,
                       compile_probe=args.compile, log=log)
        device = lab.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            for lm in lab.models.values():
                lm.model.to(memory_format=torch.channels_last)
                if lm.fast_model is not None:
                    lm.fast_model.to(memory_format=torch.channels_last)
        untrained = [lm for lm in lab.models.values() if not lm.weights.pretrained]
        if rank == 0:
            for lm in untrained:
                warn(f"{untrained_warning([lm.display_name])} ({lm.weights.note})")
            print(f"data: {len(samples)} of {len(scanned.samples)} images, "
                  f"{len({s.label for s in samples})} classes ({scanned.class_source})"
                  + (f"; {scanned.unlabelled} images without a label skipped" if scanned.unlabelled else ""),
                  file=sys.stderr)
        gpu = device.type == "cuda"
        options = ReproduceOptions(
            batch_size=args.batch_size or (64 if gpu else 8),
            probe_batch_size=args.probe_batch_size or (256 if gpu else 32),
            precision=args.precision, workers=args.workers if args.workers is not None else (4 if gpu else 1),
            probe=not args.no_probe, checkpoint_every=args.checkpoint_every, fresh=args.fresh,
            progress=not args.no_progress, faithfulness=args.faithfulness, faithfulness_steps=args.faithfulness_steps,
            faithfulness_method=args.faithfulness_method, faithfulness_layer=args.faithfulness_layer)
        result = run_reproduce(lab, scanned.root, samples, options, state_dir=args.out / "state", log=log)
        if rank == 0:
            data = {**scanned.describe(), "limit": args.limit, "images_selected": len(samples)}
            write_outputs(result, args.out, figure_classes=figure_classes, data=data)
            _report(result, args.out)
            if untrained:
                warn(untrained_warning([lm.display_name for lm in untrained]) + ' (summary.json: "pretrained": false)')
        return _agree(UNDECODABLE if result.decode_errors else DONE, rank, world)
    except Exception as exc:
        if world == 1 or isinstance(exc, dist.DistError):
            raise  # one process: main reports it; a collective that failed: no more collectives
        return _agree(_failure(exc, rank), rank, world)
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def exit_status(outcome: int, world: int) -> int:
    """0 done; 3 done, but some files could not be decoded (one process only); 2 a problem with
    the input (data, labels, weights, a saved state); 1 anything else.

    Under torchrun (``world`` > 1) undecodable files give 0 on every rank: torchrun takes any
    other status of a worker as a failure (it reports ChildFailedError, exits 1 itself, so a
    scheduler never sees the 3, and restarts every worker under --max-restarts), while the run
    is complete. The count is in summary.json (``decode_errors``) and rank 0 warns.
    """
    return {DONE: 0, UNDECODABLE: 3 if world == 1 else 0, FAILED: 2}.get(outcome, 1)


def _failure(exc: Exception, rank: int) -> int:
    """Report this rank's failure (under torchrun) and return its outcome."""
    from ..reproduce.distributed import PeerFailed

    if isinstance(exc, PeerFailed):
        error(str(exc))
        return DONE  # the rank that failed brings the outcome
    if usage_error(exc):
        error(f"rank {rank}: {exc}")
        return FAILED
    print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
    return CRASHED


def _agree(outcome: int, rank: int, world: int) -> int:
    """Every rank's outcome, agreed (a collective under torchrun: every rank calls it once)."""
    from ..reproduce.distributed import finish

    agreed = finish(outcome)
    if world > 1 and rank == 0 and agreed == UNDECODABLE:
        warn("some files could not be decoded (summary.json: decode_errors); the exit status is 0 under "
             "torchrun, which would take any other for a failed worker (docs/reproduce.md)")
    return exit_status(agreed, world)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _report(result: Any, out: Path) -> None:
    lines = [f"{result.images} images ({result.decode_errors} could not be decoded), "
             f"{len(result.present_classes())} classes"]
    for key, m in result.models.items():
        text = f"  {m['display_name']}: top-1 {result.top1(key):.2%}"
        group = result.group_top1(key)
        if group is not None:
            text += (f"; {m['probe_paper_name'] or m['probe_layer']} group top-1 mean {group.mean():.2%}, "
                     f"best k={int(group.argmax())} {group.max():.2%}, worst k={int(group.argmin())} {group.min():.2%}")
        if not m["pretrained"]:
            text += " [UNTRAINED]"
        lines.append(text)
    rate, overall = result.images_per_s, result.images_per_s_overall
    dev = result.device
    probed = any(result.group_top1(k) is not None for k in result.models)
    text = f"throughput: {rate:.2f} images/s" if rate else "throughput: nothing left to compute"
    text += (f" over {result.world_size} process(es) on {dev['device']} ({dev.get('name', '')}), "
             + (f"masked forwards in {result.precision}" if probed else "no probe")
             + f"; {result.seconds:.1f} s this session")
    if result.images_resumed:
        text += f"; {result.images_resumed} images from saved state"
        if overall:
            text += f", {overall:.2f} images/s over all sessions"
    lines.append(text)
    lines += _correlation_lines(result)
    lines += _faithfulness_lines(out)
    lines.append(f"wrote {out}/summary.json and the CSV, figures and profiles beside it")
    print("\n".join(lines), file=sys.stderr)


def _correlation_lines(result: Any) -> list[str]:
    """Per gated model, its mean between-class correlation at the first and last depth."""
    if len(result.present_classes()) < 2:
        return []
    lines = []
    for key in result.gated():
        m = result.models[key]
        corr = result.class_correlation(key)
        ends = [(d, corr.mean_between[d]) for d in (corr.depths[0], corr.depths[-1])]
        text = " -> ".join(f"{'undefined' if v != v else f'{v:.3f}'} ({d})" for d, v in ends)
        lines.append(f"  {m['display_name']}: mean between-class correlation of {m['gates']['kind']} profiles {text}"
                     + ("" if m["pretrained"] else " [UNTRAINED]"))
    return lines


def _faithfulness_lines(out: Path) -> list[str]:
    """The faithfulness block of the summary.json just written (its bootstrap is not run again)."""
    import json

    block = json.loads((out / "summary.json").read_text()).get("faithfulness")
    if block is None or not block["images"]:
        return []

    def show(stat: dict[str, Any]) -> str:
        low, high = stat["ci95"]
        return f"{stat['mean']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    lines = [f"faithfulness of {block['method']} at {block['layer']} over {block['images']} images "
             "(mean [95% bootstrap CI]); deletion: lower is better, insertion and ROAD: higher"]
    lines += [f"  {m['display_name']}: deletion AUC {show(m['deletion_auc'])}, insertion AUC "
              f"{show(m['insertion_auc'])}, ROAD {show(m['road_combined'])}"
              + ("" if m["pretrained"] else " [UNTRAINED]") for m in block["models"].values()]
    if "paired_difference" in block:
        d = block["paired_difference"]
        lines.append(f"  SANet50 - ResNet50 per image: deletion AUC {show(d['deletion_auc'])}, insertion AUC "
                     f"{show(d['insertion_auc'])}, ROAD {show(d['road_combined'])}")
    return lines
