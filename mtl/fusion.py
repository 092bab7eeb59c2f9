"""Score fusion: per-task probabilities -> one ranking score.

Methods (``FUSIONS``):

- ``weighted_sum``: ``sum_k w_k p_k``.
- ``weighted_product``: ``prod_k p_k ** w_k`` (computed as ``exp(sum_k w_k log p_k)``); the
  usual industrial form, invariant to each task's calibration scale up to a monotone map.
- ``weighted_rank``: ``sum_k w_k rank_k / N`` with average ranks; insensitive to
  calibration altogether.

Weights are non-negative; the fusion weights are what the tuner searches.

Example:
    >>> import numpy as np
    >>> fuse(np.array([[0.1, 0.5], [0.2, 0.1]]), [1.0, 1.0], "weighted_sum").round(2).tolist()
    [0.6, 0.3]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _check(probs: np.ndarray, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(w):
        raise ValueError(f"probs must be [N, K] with K = len(weights) = {len(w)}, got {probs.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"fusion weights must be finite and non-negative, got {w.tolist()}")
    return probs, w


def weighted_sum(probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    probs, w = _check(probs, weights)
    return probs @ w


def weighted_product(probs: np.ndarray, weights: Sequence[float], eps: float = 1e-12) -> np.ndarray:
    probs, w = _check(probs, weights)
    return np.exp(np.log(np.clip(probs, eps, 1.0)) @ w)


def weighted_rank(probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    probs, w = _check(probs, weights)
    order = np.argsort(probs, axis=0, kind="stable")
    ranks = np.empty_like(probs)
    n = probs.shape[0]
    for k in range(probs.shape[1]):  # K is small (<= 7); each column is one sort
        col = probs[order[:, k], k]
        pos = np.arange(1, n + 1, dtype=np.float64)
        first = np.r_[True, col[1:] != col[:-1]]
        tie = np.cumsum(first) - 1
        starts = np.flatnonzero(first)
        ends = np.r_[starts[1:], n] - 1
        ranks[order[:, k], k] = ((pos[starts] + pos[ends]) / 2.0)[tie]
    return ranks @ w / n


FUSIONS: dict[str, Callable[..., np.ndarray]] = {
    "weighted_sum": weighted_sum,
    "weighted_product": weighted_product,
    "weighted_rank": weighted_rank,
}


def fuse(probs: np.ndarray, weights: Sequence[float], method: str = "weighted_product") -> np.ndarray:
    """Fuse ``[N, K]`` task probabilities into ``[N]`` ranking scores with ``method``."""
    try:
        fn = FUSIONS[method]
    except KeyError:
        raise ValueError(f"unknown fusion {method!r}; choose from {sorted(FUSIONS)}") from None
    return fn(probs, weights)
