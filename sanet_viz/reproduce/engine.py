"""The data-set engine: every model of a lab over a list of samples, kept as sums and counts.

:func:`run` is a few named steps: plan (classes, precisions, fingerprint), restore a checkpoint,
load this rank's shard, loop (with checkpoints), reduce across ranks, build the result. Tests
drive it with tiny models; ``cli/reproduce.py`` is the command line around it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import models
from ..analysis import AnalysisOptions, explain_model, probe_model
from ..cam import CAM_METHODS
from ..hooks import FeatureCapture, GateRecorder
from ..lab import Lab, LoadedModel
from ..preprocessing import PreparedImage
from ..probes import group_maps
from . import distributed
from . import faithfulness as faith
from .classes import DatasetError
from .data import ImageDataset, Sample, ShardSampler, check_same_crop, shard_size
from .result import ReproduceResult, device_info, gate_sum_key
from .state import Progress, ReproduceStateError, fingerprint, restore, save_state, state_path

__all__ = ["ReproduceOptions", "ReproduceInterrupted", "evaluate_batch", "decide_precisions", "run"]


@dataclass
class ReproduceOptions:
    batch_size: int = 8  # images per loader batch (unmasked forward)
    probe_batch_size: int = 32  # masked inputs per forward
    precision: str = "fp32"  # of the masked forwards ("auto": see decide_precisions); unmasked is fp32
    model_precision: dict[str, str] | None = None  # per model, resolved by run(); wins over precision
    workers: int = 0
    probe: bool = True
    checkpoint_every: int = 20  # batches between saved states (per rank)
    fresh: bool = False  # ignore a saved state
    progress: bool = True
    stop_after_batches: int | None = None  # testing hook: save and stop as if interrupted
    max_error_examples: int = 20
    # Faithfulness of each image's CAM of its predicted class (reproduce/faithfulness.py); the
    # layer None is each model's probe layer (layer4.2 = SA_5_3).
    faithfulness: bool = False
    faithfulness_steps: int = 32
    faithfulness_method: str = "gradcam"
    faithfulness_layer: str | None = None

    def precision_for(self, key: str) -> str:
        return (self.model_precision or {}).get(key, self.precision)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.probe_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be at least 1")
        if self.faithfulness_steps < 1:
            raise ValueError("--faithfulness-steps must be at least 1")
        if self.faithfulness_method not in CAM_METHODS:
            raise ValueError(f"--faithfulness-method: unknown CAM method {self.faithfulness_method!r}; choose from "
                             f"{', '.join(CAM_METHODS)}")


class ReproduceInterrupted(RuntimeError):
    """Stopped before the end; the partial sums are saved and a rerun continues."""


@torch.no_grad()
def gate_info(lm: LoadedModel) -> dict[str, Any] | None:
    """What a gated model's gates are, for the run's sums and its result: kind (SA, SE, ECA),
    unit (an SA group's mean, or one channel), branches, depth names, hooked modules and the
    number of gates per branch at each depth (SA: its groups; SE, ECA: the module's channels,
    read from one forward of a blank crop). None for a model without gates."""
    if not lm.has_gates:
        return None
    layout = lm.gate_layout
    assert layout is not None
    size = lm.transform.crop_size
    with lm.lock, GateRecorder(lm.model, layout, lm.gate_modules) as recorder:
        lm.model(torch.zeros(1, 3, size, size, device=lm.device))
    widths = []
    for depth in lm.gate_modules:
        found = {int(recorder.values[depth][b].shape[-1]) for b in layout.branches}
        if len(found) != 1:
            raise ValueError(f"{lm.display_name}: the branches at {depth} have different widths {sorted(found)}")
        widths.append(found.pop())
    return {"kind": layout.kind, "title": layout.title, "unit": layout.unit, "branches": list(layout.branches),
            "depths": list(lm.gate_modules), "modules": dict(lm.gate_modules), "widths": widths}


def _zero_sums(lab: Lab, gates: Mapping[str, dict[str, Any] | None], num_classes: int, probe: bool,
               device: torch.device) -> dict[str, Tensor]:
    i64, f64 = {"dtype": torch.int64, "device": device}, {"dtype": torch.float64, "device": device}
    sums = {"images": torch.zeros((), **i64), "decode_errors": torch.zeros((), **i64),
            "class_images": torch.zeros(num_classes, **i64)}
    for key, lm in lab.models.items():
        sums[f"{key}.correct"] = torch.zeros((), **i64)
        sums[f"{key}.class_correct"] = torch.zeros(num_classes, **i64)
        sums[f"{key}.unmasked_score"] = torch.zeros((), **f64)
        if probe:
            sums[f"{key}.group_correct"] = torch.zeros(lm.probe_groups, **i64)
            sums[f"{key}.group_score"] = torch.zeros(lm.probe_groups, **f64)
        info = gates.get(key)
        if info is not None:  # per depth and branch: the sum of each class's images' gates (K, width)
            for depth, width in zip(info["depths"], info["widths"], strict=True):
                for branch in info["branches"]:
                    sums[gate_sum_key(key, depth, branch)] = torch.zeros((num_classes, width), **f64)
    return sums


@dataclass
class _ModelBatch:
    predicted: Tensor  # (B,) the unmasked prediction
    correct: Tensor  # (B,) bool
    unmasked_score: Tensor  # (B,) softmax of the predicted class
    group_correct: Tensor | None  # (B, G) bool
    group_score: Tensor | None  # (B, G)
    gates: dict[str, dict[str, Tensor]] | None  # depth -> branch -> (B, width) float64


@torch.no_grad()
def evaluate_batch(lm: LoadedModel, x: Tensor, y: Tensor, options: ReproduceOptions) -> _ModelBatch:
    """One model on one batch (``x``: its own preprocessing): the unmasked forward (fp32, hooked:
    the probe layer's output and every gate) and the group probe."""
    with lm.lock, FeatureCapture(lm.model, [lm.probe_layer]) as capture, \
            GateRecorder(lm.model, lm.gate_layout, lm.gate_modules) as recorder:
        logits = lm.model(x).float()
    predicted = logits.argmax(-1)
    unmasked = torch.softmax(logits, -1).gather(1, predicted[:, None]).squeeze(1)
    group_correct = group_score = None
    if options.probe:
        maps = group_maps(capture.outputs[lm.probe_layer], lm.probe_groups)
        with lm.lock:
            group_score, preds = lm.run_probe(x, maps, predicted, precision=options.precision_for(lm.key),
                                              batch_size=options.probe_batch_size)
        group_correct = preds == y[:, None]
    gates = {depth: {b: v.double() for b, v in recorder.values[depth].items()} for depth in lm.gate_modules} \
        if lm.has_gates else None
    return _ModelBatch(predicted, predicted == y, unmasked, group_correct, group_score, gates)


def decide_precisions(lab: Lab, root: str | Path, samples: Sequence[Sample],
                      options: ReproduceOptions) -> dict[str, str]:
    """Per model, the masked forwards' precision: an explicit fp32/bf16 as asked; ``auto`` as the
    analysis does it (bf16 where native and where bf16 matches fp32 by the issue's rule on the
    data set's first decodable image, else fp32). Every rank decides on the same image.
    """
    wanted = {key: lm.probe_precision(options.precision) for key, lm in lab.models.items()}
    if "check" in wanted.values() and options.probe:
        dataset = ImageDataset(root, samples, transform=lab.transforms)
        first = next((item for item in (dataset[i] for i in range(min(len(dataset), 50))) if item[3]), None)
        if first is not None:
            tensors = first[0][:, None] if dataset.stacked else first[0][None, None]  # (T, 1, 3, H, W)
            image = PreparedImage(tensors[0], np.zeros((1, 1, 3), np.uint8), tuple(first[0].shape[-2:]),
                                  transform=dataset.transforms[0],
                                  others=dict(zip(dataset.transforms[1:], tensors[1:], strict=True)))
            name = samples[first[2]].path
            for key, lm in lab.models.items():
                if wanted[key] == "check":
                    explained = explain_model(lm, image, AnalysisOptions(precision="auto", gates=False))
                    with lm.lock:
                        probe_model(lm, image, explained, AnalysisOptions(precision="auto"), name=name)
                    wanted[key] = lm.probe_precision("auto")
    return {key: value.replace("check", "fp32") for key, value in wanted.items()}


def _commit(sums: dict[str, Tensor], y: Tensor, outs: Mapping[str, _ModelBatch]) -> None:
    sums["images"] += len(y)
    sums["class_images"].index_add_(0, y, torch.ones_like(y))
    for key, o in outs.items():
        sums[f"{key}.correct"] += o.correct.sum()
        sums[f"{key}.class_correct"].index_add_(0, y, o.correct.long())
        sums[f"{key}.unmasked_score"] += o.unmasked_score.double().sum()
        if o.group_correct is not None and o.group_score is not None:
            sums[f"{key}.group_correct"] += o.group_correct.long().sum(0)
            sums[f"{key}.group_score"] += o.group_score.double().sum(0)
        for depth, branches in (o.gates or {}).items():
            for branch, values in branches.items():
                sums[gate_sum_key(key, depth, branch)].index_add_(0, y, values)


@dataclass
class _Plan:
    """What every rank has agreed to compute."""

    options: ReproduceOptions  # with each model's precision resolved
    num_classes: int
    fingerprint: str
    rank: int
    world: int
    gates: dict[str, dict[str, Any] | None]  # per model: gate_info (None: no gates)


def _plan(lab: Lab, root: str | Path, samples: Sequence[Sample], options: ReproduceOptions) -> _Plan:
    """Step 1: check classes and labels, decide precisions, fingerprint the run."""
    rank, world = distributed.rank_world()
    check_same_crop(lab.transforms)
    num_classes = {lm.num_classes for lm in lab.models.values()}
    if len(num_classes) != 1:
        raise ValueError(f"the models predict different numbers of classes: {sorted(num_classes)}")
    k_classes = num_classes.pop()
    bad = [s for s in samples if not 0 <= s.label < k_classes]
    if bad:
        raise DatasetError(f"{bad[0].path}: label {bad[0].label} is outside the models' 0..{k_classes - 1}")
    model_precision = decide_precisions(lab, root, samples, options)
    distinct = set(model_precision.values())
    precision = distinct.pop() if len(distinct) == 1 else ", ".join(f"{k} {v}" for k, v in model_precision.items())
    options = replace(options, precision=precision, model_precision=model_precision)
    gates = {key: gate_info(lm) for key, lm in lab.models.items()}
    meta = {"world": world, "precision": options.precision, "probe": options.probe, "num_classes": k_classes,
            "models": {k: [lm.weights.source, lm.weights.sha256, lm.probe_layer, lm.probe_groups,
                           gates[k], asdict(lm.transform)] for k, lm in lab.models.items()}}
    if options.faithfulness:  # only then: earlier runs' fingerprints stay valid
        meta["faithfulness"] = [options.faithfulness_steps, options.faithfulness_method, options.faithfulness_layer]
    return _Plan(options, k_classes, fingerprint(samples, meta), rank, world, gates)


def _restore_checkpoint(plan: _Plan, progress: Progress, state_dir: Path | None,
                        say: Callable[[str], None]) -> Path | None:
    """Step 2: continue from this rank's saved state, if it is this run's; every rank must agree."""
    path = state_path(state_dir, plan.rank, plan.world) if state_dir is not None else None
    problem = ""
    if path is not None:
        if plan.options.fresh and path.exists():
            path.unlink()
        elif path.exists():
            problem = restore(path, plan.fingerprint, progress)
        if plan.rank == 0 and not plan.options.fresh and state_dir.is_dir():
            mine = f"-of-{plan.world:04d}.pt"
            others = [p.name for p in state_dir.glob("rank*-of-*.pt") if not p.name.endswith(mine)]
            if others:
                say(f"note: ignoring saved states of a run with another number of processes: {others[0]} ...")
    if problem:  # before any collective: the other ranks learn it at check_peers
        raise ReproduceStateError(problem)
    distributed.check_peers()
    if len(set(distributed.gather_objects(plan.fingerprint))) > 1:  # the same verdict on every rank
        raise ReproduceStateError("the ranks see different data or models (every rank needs the same folder "
                                  "contents, --limit, weights and precision)")
    return path


def _loader(lab: Lab, root: str | Path, samples: Sequence[Sample], plan: _Plan, done: int) -> DataLoader:
    """Step 3: this rank's shard, from where it stopped."""
    options = plan.options
    return DataLoader(ImageDataset(root, samples, transform=lab.transforms), batch_size=options.batch_size,
                      sampler=ShardSampler(len(samples), plan.rank, plan.world, done),
                      num_workers=options.workers, pin_memory=lab.device.type == "cuda",
                      prefetch_factor=4 if options.workers else None, persistent_workers=False)


def _progress_bar(lab: Lab, plan: _Plan, total: int, done: int) -> object | None:
    if plan.rank != 0 or not plan.options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                desc=f"reproduce (rank 0 of {plan.world})" if plan.world > 1 else "reproduce")


def _loop(lab: Lab, loader: DataLoader, plan: _Plan, progress: Progress, path: Path | None, total: int,
          say: Callable[[str], None]) -> int:
    """Step 4: evaluate every batch, commit its counts, save a checkpoint every few batches.

    Returns the samples counted in this session. Ctrl-C/SIGTERM saves what was committed.
    """
    options, device = plan.options, lab.device
    session = batches = 0
    committing = False
    start = time.perf_counter()

    def checkpoint() -> None:
        if path is not None:
            save_state(path, plan.fingerprint, progress, progress.earlier_seconds + time.perf_counter() - start)

    bar = _progress_bar(lab, plan, total, progress.done)
    try:
        for x, y, index, ok, messages in loader:
            bad = [m for m, good in zip(messages, ok.tolist(), strict=True) if not good]
            for msg in bad:
                if bar is not None:
                    bar.write(f"skipped: {msg}", file=sys.stderr)  # type: ignore[attr-defined]
                if len(progress.errors) < options.max_error_examples:
                    progress.errors.append(msg)
            # Copy first, then drop the undecodable: indexing would make an unpinned copy on the host.
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if bad:
                keep = ok.to(device)
                x, y = x[keep], y[keep]
            inputs = _model_inputs(lab, x)
            outs = {key: evaluate_batch(lm, inputs[key], y, options) for key, lm in lab.models.items()} \
                if len(y) else {}
            measured = _faithfulness(lab, inputs, outs, options) if options.faithfulness and len(y) else {}
            committing = True
            if len(y):
                _commit(progress.sums, y, outs)
            if measured:
                faith.commit(progress.sums, index[ok], measured)
            progress.sums["decode_errors"] += len(bad)
            progress.done += len(ok)
            committing = False
            session += len(ok)
            batches += 1
            if bar is not None:
                _show_accuracy(bar, lab, progress.sums, len(ok))
            if batches % options.checkpoint_every == 0:
                checkpoint()
            if options.stop_after_batches is not None and batches >= options.stop_after_batches:
                checkpoint()
                raise ReproduceInterrupted(f"stopped after {batches} batches ({progress.done} of {total} images); "
                                           "run again to continue")
    except KeyboardInterrupt:
        if path is not None and not committing:
            checkpoint()
            say(f"\ninterrupted: partial sums saved in {path.parent}; run the same command to continue")
        raise
    finally:
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
    checkpoint()
    progress.earlier_seconds += time.perf_counter() - start  # now: all sessions' loop time
    return session


def _model_inputs(lab: Lab, x: Tensor) -> dict[str, Tensor]:
    """Each model's input: the batch itself when every model shares one preprocessing, else its
    preprocessing's slice of the stacked batch (B, T, 3, H, W) (see data.ImageDataset)."""
    transforms = lab.transforms
    if len(transforms) == 1:
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return dict.fromkeys(lab.models, x)
    memory = torch.channels_last if x.device.type == "cuda" else torch.contiguous_format
    each = {t: x[:, i].contiguous(memory_format=memory) for i, t in enumerate(transforms)}
    return {key: each[lm.transform] for key, lm in lab.models.items()}


def _faithfulness(lab: Lab, inputs: Mapping[str, Tensor], outs: Mapping[str, _ModelBatch],
                  options: ReproduceOptions) -> dict[str, list[faith.Faithfulness]]:
    return {key: faith.evaluate(lm, inputs[key], outs[key].predicted, steps=options.faithfulness_steps,
                                precision=options.precision_for(key), batch_size=options.probe_batch_size,
                                method=options.faithfulness_method, layer=options.faithfulness_layer)
            for key, lm in lab.models.items()}


def _show_accuracy(bar: object, lab: Lab, sums: Mapping[str, Tensor], advanced: int) -> None:
    bar.update(advanced)  # type: ignore[attr-defined]
    seen = int(sums["images"])
    if seen:
        bar.set_postfix({lm.display_name: f"{int(sums[f'{k}.correct']) / seen:.1%}"  # type: ignore[attr-defined]
                         for k, lm in lab.models.items()}, refresh=False)


def run(lab: Lab, root: str | Path, samples: Sequence[Sample], options: ReproduceOptions, *,
        state_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> ReproduceResult:
    """Evaluate every model of ``lab`` on ``samples`` (paths relative to ``root``).

    Under torch.distributed (initialised by the caller), each rank takes every world-th sample and
    the sums are all-reduced at the end, so every rank returns the same result. A rank that
    fails raises here; the others raise :class:`distributed.PeerFailed` at their next agreement
    point, once the failed rank has called :func:`distributed.finish` (which every rank then
    calls; see ``distributed``). With
    ``state_dir``, partial sums are saved there (per rank) every ``checkpoint_every`` batches and
    on Ctrl-C/SIGTERM, and a later call with the same data, models and world size continues.
    """
    device = lab.device
    plan = _plan(lab, root, samples, options)
    say = log if (log and plan.rank == 0) else (lambda _m: None)
    progress = Progress(_zero_sums(lab, plan.gates, plan.num_classes, plan.options.probe, device))
    if options.faithfulness:
        progress.sums.update(faith.zero_sums(lab, len(samples), options.faithfulness_steps, device))
    path = _restore_checkpoint(plan, progress, Path(state_dir) if state_dir is not None else None, say)
    resumed = int(progress.sums["images"] + progress.sums["decode_errors"])
    total = shard_size(len(samples), plan.rank, plan.world)
    if progress.done:
        say(f"resuming: {progress.done} of this rank's {total} images were done before")
    started = time.perf_counter()
    session = _loop(lab, _loader(lab, root, samples, plan, progress.done), plan, progress, path, total, say)
    distributed.check_peers()  # a rank whose loop failed is not coming to the reductions
    result = _reduce_and_build(lab, plan, progress, session, resumed, time.perf_counter() - started)
    if options.faithfulness:
        result.faithfulness = faith.settings(lab, steps=options.faithfulness_steps, method=options.faithfulness_method,
                                             layer=options.faithfulness_layer)
        result.sample_paths = [s.path for s in samples]
    return result


def _reduce_and_build(lab: Lab, plan: _Plan, progress: Progress, session: int, resumed: int,
                      seconds: float) -> ReproduceResult:
    """Steps 5 and 6: sums of every rank, the slowest rank's times, and the result."""
    distributed.reduce_sums(progress.sums)
    counts = {"session": torch.tensor(session, device=lab.device), "resumed": torch.tensor(resumed, device=lab.device)}
    distributed.reduce_sums(counts)
    errors = distributed.gather_lists(progress.errors)[: plan.options.max_error_examples]
    seconds, seconds_total = distributed.max_across_ranks([seconds, progress.earlier_seconds], lab.device)
    options = plan.options
    model_info = {key: {"display_name": lm.display_name, "pretrained": lm.weights.pretrained,
                        "weights": lm.weights.to_dict(), "weights_note": lm.weights.note,
                        "probe_layer": lm.probe_layer, "probe_paper_name": models.paper_name_or_none(lm.probe_layer),
                        "sa_depths": list(lm.sa_modules), "gates": plan.gates[key],
                        "preprocessing": asdict(lm.transform), "probe_precision": options.precision_for(key),
                        "bf16_check": lm.bf16_check.to_dict() if lm.bf16_check else None}
                  for key, lm in lab.models.items()}
    first = next(iter(lab.models.values()))
    return ReproduceResult({k: v.cpu().numpy() for k, v in progress.sums.items()}, model_info,
                           list(first.categories or ()), errors, {**device_info(lab.device), "processes": plan.world},
                           options.precision, plan.world, seconds, seconds_total, int(counts["session"]),
                           int(counts["resumed"]))
