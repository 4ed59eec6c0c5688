"""The paper's per-group activation probe (official GroupAct semantics), batched.

For an image x (already normalised) and its predicted class c: the output of the probe layer
(SA_5_3 = layer4.2, after the residual add and ReLU) is split into G chunks of consecutive
channels; chunk k's channel mean, upsampled bilinearly (align_corners=False) to the input size
and min-max normalised, masks the input: score_k = softmax(model(x * a_k))[c].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["group_maps", "probe_masks", "forward_logits", "masked_scores", "probe_scores", "GroupProbe",
           "PrecisionCheck", "autocast_for", "spearman", "PROBE_GROUPS"]

PROBE_GROUPS = 64
# The rule for running the probe in bf16 by default (issue 4): every score within this of fp32,
# and the ranking of the groups kept (Spearman correlation at least this).
BF16_MAX_ABS_DIFF = 0.02
BF16_MIN_SPEARMAN = 0.95


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

    @classmethod
    def compare(cls, fp32: Tensor, bf16: Tensor, image: str, *, seconds: Mapping[str, float] | None = None,
                mixed: PrecisionCheck | None = None) -> PrecisionCheck:
        return cls(image, float((fp32.double() - bf16.double()).abs().max()), spearman(fp32.flatten(), bf16.flatten()),
                   seconds, mixed)

    @property
    def passed(self) -> bool:
        # NaN (a constant score vector: no ranking to keep) fails.
        return self.max_abs_diff <= BF16_MAX_ABS_DIFF and self.spearman >= BF16_MIN_SPEARMAN

    @property
    def verdict(self) -> str:
        """The precision ``auto`` runs the probes in after this check: bf16, mixed or fp32.

        A lower precision must pass the rule and, where the check timed it, have run faster than
        fp32: a CPU that reports native bf16 can still run it slower (a 2-vCPU Xeon here took
        1.4x fp32's time), and then bf16 would cost accuracy for nothing.
        """
        if self.passed and self._faster("bf16"):
            return "bf16"
        return "mixed" if self.mixed is not None and self.mixed.passed and self._faster("mixed") else "fp32"

    def _faster(self, precision: str) -> bool:
        if not self.seconds or precision not in self.seconds or "fp32" not in self.seconds:
            return True  # not timed: the rule alone decides
        return self.seconds[precision] < self.seconds["fp32"]

    def describe(self) -> str:
        """One line for logs: what was compared, what came out, what it cost, what the probes use."""
        line = (f"bf16 checked against fp32 on {self.image}: max |diff| {self.max_abs_diff:.4f}, Spearman "
                f"{self.spearman:.3f}")
        if self.mixed is not None:
            line += (f"; mixed (bf16 in layer3-layer4): max |diff| {self.mixed.max_abs_diff:.4f}, Spearman "
                     f"{self.mixed.spearman:.3f}")
        line += f": probes run in {self.verdict}"
        if self.seconds:
            line += (f" (the check cost {sum(self.seconds.values()):.1f} s: "
                     + " + ".join(f"{k} probe {v:.1f} s" for k, v in self.seconds.items()) + ")")
        return line

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "max_abs_diff": round(self.max_abs_diff, 6),
                "spearman": None if self.spearman != self.spearman else round(self.spearman, 4),
                "passed": self.passed, "rule": f"max |bf16 - fp32| <= {BF16_MAX_ABS_DIFF}, "
                                               f"Spearman >= {BF16_MIN_SPEARMAN}",
                "verdict": self.verdict,
                "mixed": None if self.mixed is None else self.mixed.to_dict(),
                "seconds": None if self.seconds is None else {k: round(v, 3) for k, v in self.seconds.items()}}
