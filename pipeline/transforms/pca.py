"""PCA of fixed-width vectors (e.g. the 512-float feed embeddings), fitted on training items.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 4))
    >>> PCA(2).fit(x).transform(x).shape
    (50, 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _one_blas_thread() -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def fit_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by eigen-decomposition of the covariance: (mean [d], components [d, k], explained
    variance ratio [k]). Signs fixed so the largest-magnitude loading is positive.

    Args:
        x: ``[n, d]`` rows.
        k: components kept.
    """
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    # one BLAS thread: on a shared 2-core machine a 2-thread OpenBLAS eigh was measured 6-20x slower
    with _one_blas_thread():
        cov = xc.T @ xc / max(len(x) - 1, 1)
        evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1.0, signs)
    total = evals.clip(min=0).sum()
    ratio = evals[order].clip(min=0) / total if total > 0 else np.zeros(len(order))
    return mean, comps, ratio


class PCA:
    """A fitted projection ``(x - mean) @ components`` to ``dim`` float32 values.

    Args:
        dim: components kept.
    """

    def __init__(self, dim: int, mean: np.ndarray | None = None, components: np.ndarray | None = None,
                 explained_variance_ratio: np.ndarray | None = None) -> None:
        self.dim = dim
        self.mean, self.components, self.explained_variance_ratio = mean, components, explained_variance_ratio

    def fit(self, x: np.ndarray) -> "PCA":
        """Fit on the training items' vectors.

        Args:
            x: ``[n, width]`` vectors.
        """
        self.mean, self.components, self.explained_variance_ratio = fit_pca(x, self.dim)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``[n, dim]`` float32 projections.

        Args:
            x: ``[n, width]`` vectors.
        """
        if self.mean is None or self.components is None:
            raise RuntimeError("PCA: call fit() or load() first")
        return ((x - self.mean) @ self.components).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """An ``.npz`` with ``mean``, ``components`` and ``explained_variance_ratio``.

        Args:
            path: the file.
        """
        np.savez(path, mean=self.mean, components=self.components, explained_variance_ratio=self.explained_variance_ratio)

    @classmethod
    def load(cls, path: str | Path) -> "PCA":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        with np.load(path, allow_pickle=False) as z:
            comps = z["components"]
            return cls(comps.shape[1], z["mean"], comps, z["explained_variance_ratio"])
