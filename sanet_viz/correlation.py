"""Class correlation of SA gate profiles across depth (the paper's class-specificity analysis).

An image's SA profile at one depth is its 64 mean channel gates followed by its 64 mean spatial
gates. Per depth: the mean profile of each class, the class x class Pearson correlation of those
means, and the mean between-class (off-diagonal) correlation. The paper reads: high at early
depths (groups shared between classes), falling with depth (class-specific).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["profile_of", "class_means", "correlation_matrix", "mean_between_class", "ClassCorrelation",
           "class_correlation", "nearest_classes"]


def profile_of(gates: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]], depth: str) -> np.ndarray:
    """One image's profile at ``depth``: [channel gates (G), spatial gates (G)]."""
    g = gates[depth]
    return np.concatenate([np.asarray(g["channel"], np.float64), np.asarray(g["spatial"], np.float64)])


def class_means(profiles: np.ndarray, labels: Sequence[int | str]) -> tuple[list[int | str], np.ndarray]:
    """Mean profile per class, classes in first-seen order: (classes, (K, D))."""
    classes = list(dict.fromkeys(labels))
    labels_arr = np.asarray(labels, dtype=object)
    means = np.stack([profiles[labels_arr == c].mean(0) for c in classes])
    return classes, means


def correlation_matrix(means: np.ndarray) -> np.ndarray:
    """Pearson correlation between rows; a constant row correlates 0 with others, 1 with itself."""
    centred = means - means.mean(1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    corr = (centred / safe[:, None]) @ (centred / safe[:, None]).T
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def mean_between_class(corr: np.ndarray) -> float:
    """Mean of the off-diagonal entries (NaN for fewer than two classes)."""
    k = corr.shape[0]
    if k < 2:
        return float("nan")
    return float((corr.sum() - np.trace(corr)) / (k * (k - 1)))


@dataclass(frozen=True)
class ClassCorrelation:
    depths: list[str]  # paper names in depth order
    classes: list[int | str]
    matrices: dict[str, np.ndarray]  # depth -> (K, K)
    mean_between: dict[str, float]  # depth -> mean off-diagonal correlation

    def to_dict(self) -> dict[str, object]:
        return {"depths": self.depths, "classes": self.classes,
                "mean_between_class": self.mean_between,
                "matrices": {d: m.round(6).tolist() for d, m in self.matrices.items()}}


def class_correlation(gates_per_image: Sequence[Mapping[str, Mapping[str, Sequence[float] | np.ndarray]]],
                      labels: Sequence[int | str]) -> ClassCorrelation:
    """Class x class correlation of mean SA profiles at every depth, from per-image gates."""
    if len(gates_per_image) != len(labels):
        raise ValueError("one label per image is needed")
    if not gates_per_image:
        raise ValueError("no images")
    depths = list(gates_per_image[0])
    matrices, mean_between = {}, {}
    classes: list[int | str] = []
    for depth in depths:
        profiles = np.stack([profile_of(g, depth) for g in gates_per_image])
        classes, means = class_means(profiles, labels)
        matrices[depth] = correlation_matrix(means)
        mean_between[depth] = mean_between_class(matrices[depth])
    return ClassCorrelation(depths, classes, matrices, mean_between)


def nearest_classes(profile: np.ndarray, reference: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """Rows of ``reference`` (K, D) most correlated with ``profile`` (D,): [(row, r)], best first."""
    corr = correlation_matrix(np.vstack([profile[None], reference]))[0, 1:]
    order = np.argsort(-corr)[:k]
    return [(int(i), float(corr[i])) for i in order]
