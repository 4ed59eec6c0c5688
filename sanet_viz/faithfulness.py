"""Is a CAM faithful to its model? Deletion and insertion (RISE), ROAD, and the cascading
model-parameter randomisation sanity check, for one image and one model.

Definitions (issue 14; README, "Faithfulness"). ``x`` is the normalised model input (1, 3, H, W),
``c`` the class the CAM explains, ``m`` the CAM as saved (H, W); every score is
softmax(model(.))[c].

- **Order.** Pixels are ranked by m, most relevant first, ties by ascending flat index (a stable
  sort of -m). For i = 0..S (S steps), n_i = (i * H * W) // S.
- **Deletion**: x with its first n_i pixels set to 0 in all three channels (0 in normalised space
  is the data set's mean colour). **Insertion**: x blurred (torchvision ``gaussian_blur``, kernel
  11x11, sigma 5) with its first n_i pixels taken from x. AUC = mean over i < S of
  (s_i + s_{i+1}) / 2. Lower deletion AUC and higher insertion AUC: a more faithful map.
- **ROAD** (Rong et al. 2022) through pytorch-grad-cam's ``ROADMostRelevantFirst`` /
  ``ROADLeastRelevantFirst`` (their thresholds and noisy linear imputation, the noise seeded) and
  ``ClassifierOutputSoftmaxTarget(c)``, at percentiles 20, 40, 60, 80: the score change after
  imputation. In pytorch-grad-cam's convention, at percentile p MoRF imputes the (100 - p)% most
  relevant pixels and LeRF the (100 - p)% least relevant. ``combined`` = mean over percentiles of
  (LeRF - MoRF) / 2, as pytorch-grad-cam's ``ROADCombined``; higher: more faithful. The map is
  handed to ROAD as its pixel ranks (the order above, scaled to [0, 1]): the same order without
  ties, so each percentile imputes exactly its share. On the raw map a flat region (Grad-CAM is 0
  over much of an image) makes pytorch-grad-cam's ``mask < percentile`` test impute every pixel,
  a singular system whose solution is NaN.
- **Randomisation** (Adebayo et al. 2018): on a deep copy of the model, from the classifier down
  to the stem, one more block is re-initialised at each step and the CAM recomputed with the same
  method, layer and class; its Spearman rank correlation (average ranks for ties) and SSIM with
  the original map are reported. A map that does not change when the model is destroyed explains
  nothing.

Batched forwards run on the model's inference copy at the probe's precision
(:meth:`LoadedModel.probe_precision`; ``check`` means fp32). Long loops report through
:mod:`progress` between batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import models, progress
from .cam import compute_cam
from .hooks import ModelStateGuard
from .lab import LoadedModel
from .probes import forward_logits
from .weights import untrained_warning

__all__ = ["DEFAULT_STEPS", "ROAD_PERCENTILES", "BLUR_KERNEL", "BLUR_SIGMA", "Curve", "RoadScores",
           "Randomization", "Faithfulness", "relevance_ranks", "step_counts", "blur", "deletion_insertion",
           "road_scores", "cascade_blocks", "randomize_block", "randomization_cascade", "measure",
           "measure_randomization", "effective_precision", "ssim", "spearman_maps", "bootstrap_mean_ci",
           "verdict"]

DEFAULT_STEPS = 32
ROAD_PERCENTILES = (20, 40, 60, 80)
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
# A difference below this (AUC or score units) on one image is called a tie by verdict().
SMALL_DIFFERENCE = 0.02
# A map still this rank-correlated with the original after the whole model was randomised does
# not depend on the model (verdict() says so).
INSENSITIVE_SPEARMAN = 0.5


# ---------------------------------------------------------------------------------------------
# Results


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined value (e.g. the correlation of a constant map) is null."""
    return None if not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class Curve:
    """Scores s_0..s_S of a deletion or insertion curve."""

    scores: np.ndarray  # (S + 1,) float64

    @property
    def auc(self) -> float:
        """Mean over i < S of (s_i + s_{i+1}) / 2: the trapezoidal area on [0, 1]."""
        s = np.asarray(self.scores, dtype=np.float64)
        return float(np.mean((s[:-1] + s[1:]) / 2))

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "scores": [float(v) for v in self.scores]}


@dataclass(frozen=True)
class RoadScores:
    """Score changes after ROAD's imputation, per percentile (pytorch-grad-cam's convention)."""

    percentiles: tuple[int, ...]
    morf: np.ndarray  # (P,) most relevant imputed first: a faithful map makes these very negative
    lerf: np.ndarray  # (P,) least relevant imputed first: a faithful map keeps these near 0

    @property
    def combined(self) -> float:
        """Mean over percentiles of (LeRF - MoRF) / 2 (pytorch-grad-cam's ROADCombined)."""
        return float(np.mean((np.asarray(self.lerf, np.float64) - np.asarray(self.morf, np.float64)) / 2))

    def to_dict(self) -> dict[str, Any]:
        return {"percentiles": list(self.percentiles), "morf": [float(v) for v in self.morf],
                "lerf": [float(v) for v in self.lerf], "combined": self.combined}


@dataclass(frozen=True)
class Randomization:
    """The cascade: after step k the k + 1 top blocks (classifier first) are re-initialised."""

    names: list[str]  # per step: "fc", paper names of SA blocks (SA_5_3), module names else, "stem"
    modules: list[list[str]]  # per step: the module names randomised at that step
    spearman: np.ndarray  # (K,) rank correlation with the original CAM (NaN: a constant map)
    ssim: np.ndarray  # (K,) structural similarity with the original CAM
    cams: np.ndarray = field(repr=False)  # (K, H, W) the recomputed CAMs (the app's strip; not in JSON)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.names), "modules": [list(m) for m in self.modules],
                "spearman": [_number(float(v)) for v in self.spearman],
                "ssim": [_number(float(v)) for v in self.ssim]}


@dataclass
class Faithfulness:
    """One model's faithfulness measures on one image (``models.<key>.faithfulness`` in result.json).

    ``randomization`` is None until :func:`measure_randomization` has run (it costs one CAM per
    block); result.json then holds ``"randomization": null``.
    """

    steps: int
    precision: str  # of the batched forwards: fp32 or bf16
    deletion: Curve
    insertion: Curve
    road: RoadScores
    randomization: Randomization | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "precision": self.precision, "deletion": self.deletion.to_dict(),
                "insertion": self.insertion.to_dict(), "road": self.road.to_dict(),
                "randomization": self.randomization.to_dict() if self.randomization is not None else None}


# ---------------------------------------------------------------------------------------------
# Deletion and insertion


def relevance_ranks(cam: np.ndarray) -> np.ndarray:
    """(H, W) int64: each pixel's position in the order, 0 = most relevant (stable sort of -m)."""
    flat = np.asarray(cam, dtype=np.float32).ravel()
    order = np.argsort(-flat, kind="stable")
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(np.shape(cam))


def step_counts(steps: int, pixels: int) -> list[int]:
    """n_i = (i * pixels) // steps for i = 0..steps."""
    if steps < 1:
        raise ValueError(f"faithfulness steps must be at least 1, got {steps}")
    return [(i * pixels) // steps for i in range(steps + 1)]


def blur(x: Tensor) -> Tensor:
    """Insertion's starting point: torchvision's gaussian_blur, kernel 11x11, sigma 5 (reflect padding)."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])


def _check_inputs(x: Tensor, cam: np.ndarray) -> None:
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, C, H, W), got {tuple(x.shape)}")
    if tuple(np.shape(cam)) != tuple(x.shape[-2:]):
        raise ValueError(f"the CAM's shape {tuple(np.shape(cam))} is not the input's {tuple(x.shape[-2:])}")


def _scores(model: nn.Module, make: Callable[[Tensor], Tensor], count: int, target_class: int, *,
            batch_size: int, precision: str, channels_last: bool, progress_fn: progress.ProgressFn | None,
            what: str) -> np.ndarray:
    """softmax(model(make(j)))[c] for j = 0..count-1, ``batch_size`` inputs per forward."""
    out = np.empty(count, dtype=np.float64)
    chunks = torch.arange(count).split(batch_size)
    for done, chunk in enumerate(chunks, 1):
        batch = make(chunk)
        logits = forward_logits(model, batch, precision=precision, channels_last=channels_last)
        out[chunk.numpy()] = torch.softmax(logits, -1)[:, target_class].double().cpu().numpy()
        progress.step(progress_fn, done, len(chunks), what)
    return out


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: Tensor, cam: np.ndarray, target_class: int, *,
                       steps: int = DEFAULT_STEPS, batch_size: int = 16, precision: str = "fp32",
                       channels_last: bool = False,
                       progress_fn: progress.ProgressFn | None = None) -> tuple[Curve, Curve]:
    """Deletion and insertion curves of ``cam`` for ``model`` on ``x`` (see the module docstring).

    The 2(S + 1) perturbed inputs are built batch by batch (memory stays bounded) and scored
    with batched forwards at ``precision``.
    """
    _check_inputs(x, cam)
    h, w = x.shape[-2:]
    ranks = torch.from_numpy(relevance_ranks(cam)).to(x.device)
    counts = torch.tensor(step_counts(steps, h * w), device=x.device)
    image, blurred = x[0], blur(x)[0]

    def make(indices: Tensor) -> Tensor:
        inputs = []
        for j in indices.tolist():
            first = ranks < counts[j % (steps + 1)]  # (H, W): the n_i most relevant pixels
            inputs.append(image.masked_fill(first, 0.0) if j <= steps else torch.where(first, image, blurred))
        return torch.stack(inputs)

    scores = _scores(model, make, 2 * (steps + 1), target_class, batch_size=batch_size, precision=precision,
                     channels_last=channels_last, progress_fn=progress_fn, what="deletion and insertion")
    return Curve(scores[: steps + 1]), Curve(scores[steps + 1:])


# ---------------------------------------------------------------------------------------------
# ROAD


def _rank_map(cam: np.ndarray) -> np.ndarray:
    """The map as its pixel ranks, most relevant = 1, least = 0, no ties (float32 (H, W))."""
    ranks = relevance_ranks(cam)
    last = max(ranks.size - 1, 1)
    return ((last - ranks) / last).astype(np.float32)


@torch.no_grad()
def road_scores(model: nn.Module, x: Tensor, cam: np.ndarray, target_class: int, *,
                percentiles: Sequence[int] = ROAD_PERCENTILES, seed: int = 0, base_score: float | None = None,
                batch_size: int = 16, precision: str = "fp32", channels_last: bool = False,
                progress_fn: progress.ProgressFn | None = None) -> RoadScores:
    """ROAD MoRF and LeRF score changes at ``percentiles`` (see the module docstring).

    The imputations are pytorch-grad-cam's, in the order MoRF then LeRF, each by ascending
    percentile, with the CPU generator seeded with ``seed`` inside a forked RNG (the caller's
    random state is untouched): the numbers equal its metrics called one by one after
    ``torch.manual_seed(seed)`` on the rank map. The imputed images are then scored in batches;
    ``base_score`` (softmax(model(x))[c], e.g. the deletion curve's s_0) saves one forward.
    """
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    _check_inputs(x, cam)
    percentiles = tuple(int(p) for p in percentiles)
    metrics = [ROADMostRelevantFirst(p) for p in percentiles] + [ROADLeastRelevantFirst(p) for p in percentiles]
    ranked = torch.from_numpy(_rank_map(cam))
    image = x[0].detach().float().cpu()
    total = len(metrics) + 1
    imputed = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for done, metric in enumerate(metrics, 1):
            imputed.append(metric.perturbation(image, ranked))
            progress.step(progress_fn, done, total, "ROAD imputations")
    if base_score is None:
        imputed.append(image)
    batch = torch.stack(imputed).to(x.device, x.dtype)
    target = ClassifierOutputSoftmaxTarget(target_class)
    scores = torch.cat([target(forward_logits(model, chunk, precision=precision, channels_last=channels_last))
                        for chunk in batch.split(batch_size)]).double().cpu().numpy()
    progress.step(progress_fn, total, total, "ROAD imputations")
    base = float(scores[-1]) if base_score is None else float(base_score)
    changes = scores[: len(metrics)] - base
    return RoadScores(percentiles, changes[: len(percentiles)], changes[len(percentiles):])


# ---------------------------------------------------------------------------------------------
# Cascading model-parameter randomisation


def cascade_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The cascade's steps, classifier first: (shown name, module names) for ``fc``, every
    residual block from the last to the first (paper names for SA blocks), then the stem."""
    modules = dict(model.named_modules())
    if not {"fc", "conv1", "bn1"} <= set(modules):
        raise ValueError(f"{type(model).__name__}: the randomisation cascade needs a ResNet layout "
                         "(fc, residual blocks layerS.B, stem conv1/bn1)")
    steps: list[tuple[str, list[str]]] = [("fc", ["fc"])]
    for name in reversed(models.bottleneck_names(model)):
        shown = models.paper_name_or_none(name) if hasattr(modules[name], "sa") else None
        steps.append((shown or name, [name]))
    steps.append(("stem", ["conv1", "bn1"]))
    return steps


@torch.no_grad()
def randomize_block(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and BatchNorm running statistics), seeded.

    Layers are reset with their own initialisers (``reset_parameters``: Kaiming-uniform for
    convolutions and linear layers, BatchNorm to weight 1, bias 0, mean 0, variance 1). The SA
    layer's cweight, cbias, sweight, sbias and its GroupNorm's weight and bias have no such
    initialiser of their own (they start at constants), so they are drawn from N(0, 1). A layer
    with parameters and neither is an error, not silently left trained.
    """
    generator = torch.Generator().manual_seed(seed)
    sa_norms = {id(m.gn) for m in module.modules() if isinstance(m, models.ShuffleAttention)}
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, models.ShuffleAttention):
                for p in (m.cweight, m.cbias, m.sweight, m.sbias, m.gn.weight, m.gn.bias):
                    p.copy_(torch.randn(p.shape, generator=generator))
            elif id(m) in sa_norms:
                continue
            elif callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
            elif any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"cannot randomise {type(m).__name__}: it has parameters but no reset_parameters")


def randomization_cascade(model: nn.Module, x: Tensor, cam: np.ndarray, target_class: int, *,
                          method: str = "gradcam", layer: str = "layer4.2", seed: int = 0,
                          progress_fn: progress.ProgressFn | None = None) -> Randomization:
    """The sanity check on a deep copy of ``model`` (``model`` itself is only read).

    Step k re-initialises block k (:func:`cascade_blocks`) with seed ``seed + k`` on top of the
    earlier ones and recomputes the CAM of ``target_class`` with ``method`` at ``layer``
    (:func:`cam.compute_cam`); ``cam`` is the original map.
    """
    _check_inputs(x, cam)
    steps = cascade_blocks(model)
    victim = copy.deepcopy(model).eval()
    modules = dict(victim.named_modules())
    cams, rho, similarity = [], [], []
    for k, (_, names) in enumerate(steps):
        for name in names:
            randomize_block(modules[name], seed + k)
        new = compute_cam(victim, x, method=method, layer=layer, target_class=target_class).cam
        cams.append(new)
        rho.append(spearman_maps(cam, new))
        similarity.append(ssim(cam, new))
        progress.step(progress_fn, k + 1, len(steps), "randomisation cascade")
    return Randomization([s for s, _ in steps], [n for _, n in steps], np.array(rho), np.array(similarity),
                         np.stack(cams))


# ---------------------------------------------------------------------------------------------
# One model of a lab


def effective_precision(lm: LoadedModel, requested: str) -> str:
    """The probe's precision rule, where ``check`` (the first probe's comparison) means fp32."""
    chosen = lm.probe_precision(requested)
    return "fp32" if chosen == "check" else chosen


def measure(lm: LoadedModel, x: Tensor, cam: np.ndarray, target_class: int, *, steps: int = DEFAULT_STEPS,
            precision: str = "auto", batch_size: int = 16, seed: int = 0,
            progress_fn: progress.ProgressFn | None = None) -> Faithfulness:
    """Deletion, insertion and ROAD of ``cam`` (class ``target_class``) for ``lm`` on ``x``.

    Call it holding ``lm.lock``. Forwards run on the inference copy
    (:meth:`LoadedModel.probe_model_for`) at :func:`effective_precision`; the shared model is
    left as found.
    """
    lm.check_class(target_class)
    chosen = effective_precision(lm, precision)
    model = lm.probe_model_for(chosen)
    x = x.to(lm.device)
    options = {"batch_size": batch_size, "precision": chosen, "channels_last": lm.fast_model is not None,
               "progress_fn": progress_fn}
    with ModelStateGuard(lm.model):
        deletion, insertion = deletion_insertion(model, x, cam, target_class, steps=steps, **options)
        road = road_scores(model, x, cam, target_class, seed=seed, base_score=float(deletion.scores[0]), **options)
    return Faithfulness(steps, chosen, deletion, insertion, road)


def measure_randomization(lm: LoadedModel, x: Tensor, cam: np.ndarray, target_class: int, *,
                          method: str = "gradcam", layer: str | None = None, seed: int = 0,
                          progress_fn: progress.ProgressFn | None = None) -> Randomization:
    """:func:`randomization_cascade` of ``lm``'s model (hold ``lm.lock``; the copy is fp32)."""
    lm.check_class(target_class)
    return randomization_cascade(lm.model, x.to(lm.device), cam, target_class, method=method,
                                 layer=layer or lm.probe_layer, seed=seed, progress_fn=progress_fn)


# ---------------------------------------------------------------------------------------------
# Similarity of maps and statistics


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given the mean of the positions they share."""
    _, inverse, counts = np.unique(values.ravel(), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def spearman_maps(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties: average ranks); NaN when either is constant."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """Mean structural similarity of two maps (Wang et al. 2004).

    Gaussian window of sigma 1.5 truncated at 3.5 sigma (11 x 11), K1 = 0.01, K2 = 0.03,
    population (co)variances, averaged over the positions where the whole window lies inside the
    map (no padding). These are the numbers of scikit-image's ``structural_similarity(a, b,
    data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    x = torch.as_tensor(np.asarray(a, np.float64))[None, None]
    y = torch.as_tensor(np.asarray(b, np.float64))[None, None]
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two maps of one shape, got {tuple(np.shape(a))} and {tuple(np.shape(b))}")
    g = _gaussian_window()
    if min(x.shape[-2:]) < len(g):
        raise ValueError(f"SSIM's {len(g)}x{len(g)} window does not fit in a {tuple(x.shape[-2:])} map")

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def bootstrap_mean_ci(values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap confidence interval.

    ``resamples`` resamples of the values with replacement from ``np.random.default_rng(seed)``,
    drawn in chunks so that memory stays bounded for any number of values. The interval is
    (NaN, NaN) for fewer than two values (nothing to resample).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size < 2:
        return float(v.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // v.size)
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        means[start:start + n] = v[rng.integers(0, v.size, (n, v.size))].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(v.mean()), float(low), float(high)


# ---------------------------------------------------------------------------------------------
# One sentence for a visitor


def _votes(a: Faithfulness, b: Faithfulness) -> list[tuple[str, float, float, int]]:
    """(measure, a's value, b's value, winner: 0 = a, 1 = b, -1 = tie) for the three measures."""
    rows = [("deletion AUC", a.deletion.auc, b.deletion.auc, -1),
            ("insertion AUC", a.insertion.auc, b.insertion.auc, 1),
            ("ROAD", a.road.combined, b.road.combined, 1)]
    out = []
    for name, va, vb, sign in rows:  # sign: -1 lower is better, 1 higher is better
        winner = -1 if abs(va - vb) < SMALL_DIFFERENCE else (0 if sign * (va - vb) > 0 else 1)
        out.append((name, va, vb, winner))
    return out


def _insensitive(measures: Mapping[str, Faithfulness]) -> list[str]:
    return [name for name, f in measures.items() if f.randomization is not None
            and np.isfinite(f.randomization.spearman[-1]) and f.randomization.spearman[-1] >= INSENSITIVE_SPEARMAN]


def verdict(measures: Mapping[str, Faithfulness], *, untrained: Sequence[str] = ()) -> str:
    """One plain sentence: which model's map the numbers favour and how much to trust that.

    ``measures`` maps display names to results (one image); ``untrained`` names the models
    without pretrained weights (their numbers describe random networks, so no map is favoured).
    """
    if untrained:
        return f"These numbers favour no map: {untrained_warning(list(untrained), subject='they')}."
    caveat = ""
    if stuck := _insensitive(measures):
        caveat = (f"; {' and '.join(stuck)}'s map barely changes when its weights are randomised, so it "
                  "does not explain that model")
    if len(measures) == 1:
        (name, f), = measures.items()
        return (f"{name}'s map on this image: deletion AUC {f.deletion.auc:.3f} (lower is better), insertion AUC "
                f"{f.insertion.auc:.3f} (higher is better), ROAD {f.road.combined:.3f} (higher is better); alone, "
                f"these say little until compared with another map or over many images{caveat}.")
    (name_a, a), (name_b, b) = list(measures.items())[:2]
    votes = _votes(a, b)
    detail = ", ".join(f"{m} {va:.3f} vs {vb:.3f}" for m, va, vb, _ in votes)
    detail = f"{name_a} vs {name_b}: {detail}"
    winners = {w for *_, w in votes if w >= 0}
    anecdote = ("one image is an anecdote, not evidence (reproduce --faithfulness over a data set gives a "
                "confidence interval)")
    if not winners:
        return f"On this image the two maps are about equally faithful ({detail}); {anecdote}{caveat}."
    if len(winners) > 1:
        return f"The measures disagree on this image ({detail}), so neither map is favoured; {anecdote}{caveat}."
    winner = name_a if winners == {0} else name_b
    count = sum(w >= 0 for *_, w in votes)
    which = "all three measures favour" if count == 3 else f"{count} of 3 measures favour (the others tie)"
    return f"On this image {which} {winner}'s map ({detail}), but {anecdote}{caveat}."
