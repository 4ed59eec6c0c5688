"""The paper's per-group activation probe (official GroupAct semantics), batched.

For an image x (already normalised) and its predicted class c: the output of the probe layer
(SA_5_3 = layer4.2, after the residual add and ReLU) is split into G chunks of consecutive
channels; chunk k's channel mean, upsampled bilinearly (align_corners=False) to the input size
and min-max normalised, masks the input: score_k = softmax(model(x * a_k))[c].
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["group_maps", "probe_masks", "forward_logits", "masked_scores", "probe_scores", "GroupProbe",
           "PrecisionCheck", "autocast_for", "spearman", "best_interleaved_ms", "PROBE_GROUPS", "SPEED_MARGIN"]

PROBE_GROUPS = 64
# The rule for running the probe in bf16 by default (issue 4): every score within this of fp32,
# and the ranking of the groups kept (Spearman correlation at least this).
BF16_MAX_ABS_DIFF = 0.02
BF16_MIN_SPEARMAN = 0.95
# A lower precision is used only if it ran at most this fraction of fp32's time in the check:
# near parity, timing noise would flip the choice from one run to the next (issue 19).
SPEED_MARGIN = 0.9
# Within this of the margin a ratio is "close": the log says another run may choose otherwise.
SPEED_MARGIN_BAND = 0.05


def group_maps(features: Tensor, groups: int = PROBE_GROUPS) -> Tensor:
    """(N, C, h, w) -> (N, G, h, w): the mean of each chunk of C/G consecutive channels."""
    n, c, h, w = features.shape
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    return features.float().reshape(n, groups, c // groups, h, w).mean(2)


def probe_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Upsample (N, G, h, w) maps to ``size`` and min-max normalise each to [0, 1].

    A constant map carries no spatial evidence; the official code divides 0 by 0 there (NaN).
    We define its mask as all zeros, the limit of (a - min) / max(max - min, eps).
    """
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    span = up.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (up - lo) / span.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))


@contextlib.contextmanager
def autocast_for(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast for ``precision == "bf16"``; a no-op for fp32, and for ``mixed``, whose model
    (:class:`models.MixedPrecisionResNet`) casts between its fp32 and bf16 stages itself."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    elif precision in {"fp32", "mixed"}:
        yield
    else:
        raise ValueError(f"precision must be fp32, mixed or bf16 here, got {precision!r}")


@torch.no_grad()
def forward_logits(model: nn.Module, batch: Tensor, *, precision: str = "fp32",
                   channels_last: bool = False) -> Tensor:
    """fp32 logits of ``model`` on one ``batch`` at ``precision``: the one way every batched
    no-grad forward of the lab runs (the probe's masked inputs, faithfulness curves, ROAD).

    A model already in bf16 takes bf16 inputs directly; an fp32 model runs under autocast (see
    :func:`autocast_for`). ``channels_last`` lays the batch out for a model converted to it.
    """
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    model_dtype = next(model.parameters()).dtype
    if model_dtype != torch.float32:
        return model(batch.to(model_dtype)).float()
    with autocast_for(batch.device, precision):
        return model(batch).float()


@torch.no_grad()
def masked_scores(model: nn.Module, x: Tensor, masks: Tensor, classes: Tensor, *,
                  batch_size: int = 16, precision: str = "fp32",
                  channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax score of ``classes`` and the argmax for every masked input ``x[n] * masks[n, k]``.

    ``x`` (N, 3, H, W), ``masks`` (N, G, H, W), ``classes`` (N,) -> scores (N, G) fp32 and
    predictions (N, G). Masked inputs are built ``batch_size`` at a time, so memory stays bounded.
    ``channels_last`` lays each batch out for a model converted to channels_last.
    """
    n, g = masks.shape[:2]
    flat_index = torch.arange(n * g, device=x.device)
    scores = torch.empty(n * g, device=x.device)
    preds = torch.empty(n * g, dtype=torch.long, device=x.device)
    flat_classes = classes.to(x.device).repeat_interleave(g)
    for chunk in flat_index.split(batch_size):
        image_idx, group_idx = chunk // g, chunk % g
        batch = x[image_idx] * masks[image_idx, group_idx].unsqueeze(1).to(x.dtype)
        logits = forward_logits(model, batch, precision=precision, channels_last=channels_last)
        probs = torch.softmax(logits, dim=-1)
        scores[chunk] = probs.gather(1, flat_classes[chunk, None]).squeeze(1)
        preds[chunk] = probs.argmax(-1)
    return scores.reshape(n, g), preds.reshape(n, g)


def probe_scores(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, *, batch_size: int = 16,
                 precision: str = "fp32", channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """The probe of images ``x`` (N, 3, H, W) from their group maps (N, G, h, w): scores and
    predictions (N, G) of every masked input (see :func:`masked_scores`) for ``classes`` (N,).

    The one probe path of the analysis and of ``reproduce``. Masks are made for as many images at
    a time as one batch of masked inputs needs, so memory stays bounded for any N.
    """
    images_per_chunk = max(1, math.ceil(batch_size / maps.shape[1]))
    # The analysis passes CPU maps and labels with a GPU image: index them all on x's device.
    maps, classes = maps.to(x.device), classes.to(x.device)
    scores, preds = [], []
    for chunk in torch.arange(len(x), device=x.device).split(images_per_chunk):
        masks = probe_masks(maps[chunk], tuple(x.shape[-2:]))
        s, p = masked_scores(model, x[chunk], masks, classes[chunk], batch_size=batch_size,
                             precision=precision, channels_last=channels_last)
        scores.append(s)
        preds.append(p)
    return torch.cat(scores), torch.cat(preds)


@dataclass(frozen=True)
class GroupProbe:
    """One image's probe result at one layer."""

    layer: str  # module name, e.g. "layer4.2"
    paper_name: str  # e.g. "SA_5_3"
    groups: int
    target_class: int  # the predicted class c of the unmasked image
    scores: Tensor  # (G,) softmax(model(x * a_k))[c]
    predictions: Tensor  # (G,) argmax of each masked forward
    unmasked_score: float  # softmax(model(x))[c], the reference line

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "paper_name": self.paper_name, "groups": self.groups,
                "class": self.target_class, "scores": [float(s) for s in self.scores],
                "unmasked_score": self.unmasked_score}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d score vectors (ties broken by position); NaN when
    either is constant."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def best_interleaved_ms(runs: Mapping[str, Callable[[], object]], *, rounds: int = 3,
                        device: torch.device | None = None) -> dict[str, float]:
    """Best-of-``rounds`` milliseconds of each callable, run in turns (a, b, a, b, ...).

    Turns give every candidate the same share of whatever else the machine is doing, and the
    minimum drops the rounds that another process slowed down: the ratio of two such numbers is
    what the speed rule of :class:`PrecisionCheck` compares.
    """
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    best = dict.fromkeys(runs, math.inf)
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


@dataclass(frozen=True)
class PrecisionCheck:
    """bf16 against fp32 probe scores of one model on one image, and, where bf16 failed, the
    ``mixed`` precision (bf16 in layer3 and layer4 only, :class:`models.MixedPrecisionResNet`).

    ``auto`` precision runs the probe in bf16 only after a check that ``passed``, else in mixed
    precision only if ``mixed`` passed, else in fp32: on weights whose softmax saturates (an
    untrained ResNet50's logits reach ~50) bf16 rounding moves scores by several hundredths, so
    the hardware alone cannot decide.
    """

    image: str
    max_abs_diff: float
    spearman: float
    # What the check cost: seconds of each probe it ran ("fp32", "bf16", "mixed"); None: not measured.
    seconds: Mapping[str, float] | None = None
    mixed: PrecisionCheck | None = None  # mixed precision against fp32, tried when bf16 failed
    # The speed rule's measure: best-of-3 milliseconds of one batch of masked forwards per
    # precision, timed in turns after the probes (:func:`best_interleaved_ms`). None: the rule
    # falls back to ``seconds``, the probes' own first-call timings.
    timing_ms: Mapping[str, float] | None = None

    @classmethod
    def compare(cls, fp32: Tensor, bf16: Tensor, image: str, *, seconds: Mapping[str, float] | None = None,
                mixed: PrecisionCheck | None = None, timing_ms: Mapping[str, float] | None = None) -> PrecisionCheck:
        return cls(image, float((fp32.double() - bf16.double()).abs().max()), spearman(fp32.flatten(), bf16.flatten()),
                   seconds, mixed, timing_ms)

    @property
    def passed(self) -> bool:
        # NaN (a constant score vector: no ranking to keep) fails.
        return self.max_abs_diff <= BF16_MAX_ABS_DIFF and self.spearman >= BF16_MIN_SPEARMAN

    @property
    def verdict(self) -> str:
        """The precision ``auto`` runs the probes in after this check: bf16, mixed or fp32.

        A lower precision must pass the rule and, where the check timed it, have run in at most
        :data:`SPEED_MARGIN` of fp32's time: a CPU that reports native bf16 can still run it
        slower (a 2-vCPU Xeon here took 1.4x fp32's time), and then bf16 would cost accuracy for
        nothing; near parity the margin keeps timing noise from flipping the choice.
        """
        if self.passed and self._fast_enough("bf16"):
            return "bf16"
        return "mixed" if self.mixed is not None and self.mixed.passed and self._fast_enough("mixed") else "fp32"

    def speed_ratio(self, precision: str) -> float | None:
        """``precision``'s time over fp32's in the check (timing_ms, else seconds); None: not timed."""
        times = self.timing_ms or self.seconds
        if not times or precision not in times or not times.get("fp32"):
            return None
        return times[precision] / times["fp32"]

    def _fast_enough(self, precision: str) -> bool:
        ratio = self.speed_ratio(precision)
        return ratio is None or ratio <= SPEED_MARGIN  # not timed: the accuracy rule alone decides

    def candidates(self) -> list[str]:
        """The lower precisions that passed the accuracy rule (so their speed decides)."""
        return [p for p, ok in (("bf16", self.passed), ("mixed", self.mixed is not None and self.mixed.passed)) if ok]

    def describe(self) -> str:
        """One line for logs: what was compared, what came out, the speed ratios the choice rests
        on, what it cost, and whether another run could choose otherwise."""
        line = (f"bf16 checked against fp32 on {self.image}: max |diff| {self.max_abs_diff:.4f}, Spearman "
                f"{self.spearman:.3f}")
        if self.mixed is not None:
            line += (f"; mixed (bf16 in layer3-layer4): max |diff| {self.mixed.max_abs_diff:.4f}, Spearman "
                     f"{self.mixed.spearman:.3f}")
        ratios = {p: r for p in self.candidates() if (r := self.speed_ratio(p)) is not None}
        if self.timing_ms and ratios:
            line += "; speed (best of 3 batches, in turns): " + ", ".join(
                f"{p} at {r:.2f}x fp32's time" for p, r in ratios.items()) + f" (kept only at <= {SPEED_MARGIN:g}x)"
        line += f": probes run in {self.verdict}"
        if self.seconds:
            line += (f" (the check cost {sum(self.seconds.values()):.1f} s: "
                     + " + ".join(f"{k} probe {v:.1f} s" for k, v in self.seconds.items()) + ")")
        close = [p for p, r in ratios.items() if abs(r - SPEED_MARGIN) <= SPEED_MARGIN_BAND]
        if close:
            line += (f"; note: {' and '.join(close)} within {SPEED_MARGIN_BAND:g} of the speed margin, so a run on "
                     "a busier or quieter machine may choose otherwise (fix the choice with --precision)")
        return line

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "max_abs_diff": round(self.max_abs_diff, 6),
                "spearman": None if self.spearman != self.spearman else round(self.spearman, 4),
                "passed": self.passed, "rule": f"max |bf16 - fp32| <= {BF16_MAX_ABS_DIFF}, "
                                               f"Spearman >= {BF16_MIN_SPEARMAN}",
                "verdict": self.verdict,
                "mixed": None if self.mixed is None else self.mixed.to_dict(),
                "seconds": None if self.seconds is None else {k: round(v, 3) for k, v in self.seconds.items()},
                "timing_ms": None if self.timing_ms is None else {k: round(v, 2) for k, v in self.timing_ms.items()},
                "speed_rule": f"a lower precision only at <= {SPEED_MARGIN:g}x fp32's time"}
