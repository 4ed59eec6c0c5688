"""Class correlation of attention gate profiles across depth (the paper's class-specificity analysis).

An image's SA profile at one depth is its 64 mean channel gates followed by its 64 mean spatial
gates; an SE or ECA profile is its gate of every channel (256 ... 2048). Per depth: the mean
profile of each class, the class x class Pearson correlation of those means, and the mean
between-class (off-diagonal) correlation. The paper reads: high at early
depths (groups shared between classes), falling with depth (class-specific).

A correlation with a constant profile is undefined, and so is reported: NaN here, null in JSON,
greyed in charts, with the reason. Untrained SA layers (weight 0, bias 1) make every gate
sigmoid(1) = 0.731, equal up to float rounding; a profile whose spread is below
:data:`CONSTANT_STD` counts as constant, so that rounding noise is never drawn as a finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["profile_of", "class_means", "correlation_matrix", "mean_between_class", "ClassCorrelation",
           "class_correlation", "correlation_of_means", "nearest_classes", "constant_rows", "undefined_reason",
           "CONSTANT_STD", "SA_CONSTANT_HINT"]

# Gates live in [0, 1]; a profile that varies less than this is constant (rounding noise).
CONSTANT_STD = 1e-6


def profile_of(gates: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]], depth: str) -> np.ndarray:
    """One image's profile at ``depth``: its branches one after another: SA's [channel gates (G),
    spatial gates (G)], SE's and ECA's channel gates (one per channel)."""
    g = gates[depth]
    return np.concatenate([np.asarray(g[b], np.float64) for b in ("channel", "spatial") if b in g])


def class_means(profiles: np.ndarray, labels: Sequence[int | str]) -> tuple[list[int | str], np.ndarray]:
    """Mean profile per class, classes in first-seen order: (classes, (K, D))."""
    classes = list(dict.fromkeys(labels))
    labels_arr = np.asarray(labels, dtype=object)
    means = np.stack([profiles[labels_arr == c].mean(0) for c in classes])
    return classes, means


def constant_rows(rows: np.ndarray) -> np.ndarray:
    """(K,) True where a row's standard deviation is below :data:`CONSTANT_STD`."""
    return np.asarray(rows, np.float64).std(axis=1) < CONSTANT_STD


def correlation_matrix(means: np.ndarray) -> np.ndarray:
    """Pearson correlation between rows; NaN in every entry that involves a constant row
    (its correlation with anything, itself included, is undefined)."""
    means = np.asarray(means, np.float64)
    centred = means - means.mean(1, keepdims=True)
    constant = constant_rows(means)
    norms = np.where(constant, 1.0, np.linalg.norm(centred, axis=1))
    unit = centred / norms[:, None]
    corr = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    corr[constant, :] = np.nan
    corr[:, constant] = np.nan
    return corr


def mean_between_class(corr: np.ndarray) -> float:
    """Mean of the defined off-diagonal entries; NaN for fewer than two classes or none defined."""
    k = corr.shape[0]
    if k < 2:
        return float("nan")
    off = corr[~np.eye(k, dtype=bool)]
    defined = off[~np.isnan(off)]
    return float(defined.mean()) if defined.size else float("nan")


SA_CONSTANT_HINT = "untrained SA layers give every gate sigmoid(1) = 0.731"


def undefined_reason(corr: np.ndarray, constant: np.ndarray, constant_hint: str = SA_CONSTANT_HINT) -> str | None:
    """Why a depth's mean between-class correlation is undefined or partial (None if it is neither).
    ``constant_hint`` says what makes every profile constant (SA's by default)."""
    k = corr.shape[0]
    if k < 2:
        return "only one class: there is no between-class correlation"
    if constant.all():
        return f"every class profile is constant ({constant_hint}): correlation is undefined"
    if k - int(constant.sum()) < 2:
        return "all but one class profile are constant: correlation is undefined"
    if constant.any():
        return f"{int(constant.sum())} of {k} class profiles are constant; their correlations are left out"
    return None


@dataclass(frozen=True)
class ClassCorrelation:
    depths: list[str]  # paper names in depth order
    classes: list[int | str]
    matrices: dict[str, np.ndarray]  # depth -> (K, K); NaN where undefined
    mean_between: dict[str, float]  # depth -> mean off-diagonal correlation; NaN where undefined
    notes: dict[str, str] = field(default_factory=dict)  # depth -> why it is undefined or partial

    def defined(self, depth: str) -> bool:
        return not np.isnan(self.mean_between[depth])

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: ``mean_between_class_correlation`` aligned with ``depths`` (null where
        undefined), the matrices (null entries where undefined) and the reasons."""
        def clean(value: float) -> float | None:
            return None if np.isnan(value) else round(float(value), 6)

        return {"classes": self.classes, "depths": self.depths,
                "mean_between_class_correlation": [clean(self.mean_between[d]) for d in self.depths],
                "undefined": {d: self.notes[d] for d in self.depths if d in self.notes},
                "matrices": {d: [[clean(v) for v in row] for row in m] for d, m in self.matrices.items()}}


def class_correlation(gates_per_image: Sequence[Mapping[str, Mapping[str, Sequence[float] | np.ndarray]]],
                      labels: Sequence[int | str]) -> ClassCorrelation:
    """Class x class correlation of mean SA profiles at every depth, from per-image gates."""
    if len(gates_per_image) != len(labels):
        raise ValueError("one label per image is needed")
    if not gates_per_image:
        raise ValueError("no images")
    depths = list(gates_per_image[0])
    means_per_depth: dict[str, np.ndarray] = {}
    classes: list[int | str] = []
    for depth in depths:
        profiles = np.stack([profile_of(g, depth) for g in gates_per_image])
        classes, means_per_depth[depth] = class_means(profiles, labels)
    return correlation_of_means(depths, classes, means_per_depth)


def correlation_of_means(depths: Sequence[str], classes: Sequence[int | str], means: Mapping[str, np.ndarray], *,
                         constant_hint: str = SA_CONSTANT_HINT) -> ClassCorrelation:
    """:class:`ClassCorrelation` of per-class mean profiles (depth -> (K, D)); ``constant_hint``:
    what makes every profile constant, for the note of an undefined depth."""
    matrices, mean_between, notes = {}, {}, {}
    for depth in depths:
        matrices[depth] = correlation_matrix(means[depth])
        mean_between[depth] = mean_between_class(matrices[depth])
        note = undefined_reason(matrices[depth], constant_rows(means[depth]), constant_hint)
        if note:
            notes[depth] = note
    return ClassCorrelation(list(depths), list(classes), matrices, mean_between, notes)


def nearest_classes(profile: np.ndarray, reference: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """Rows of ``reference`` (K, D) most correlated with ``profile`` (D,): [(row, r)], best first.

    Rows whose correlation is undefined (constant profiles) are left out; a constant ``profile``
    gives an empty list.
    """
    corr = correlation_matrix(np.vstack([profile[None], reference]))[0, 1:]
    defined = np.flatnonzero(~np.isnan(corr))
    order = defined[np.argsort(-corr[defined], kind="stable")][:k]
    return [(int(i), float(corr[i])) for i in order]
