"""Dense numbers: empty -> 0, then optional ``log1p`` and standardisation with the training
mean and standard deviation (``transform``: none, log1p, standard, log1p_standard).

Example:
    >>> import numpy as np

    >>> s = DenseScaler("standard").fit(np.array([1.0, 3.0]))
    >>> s.transform(np.array([2.0, 3.0])).tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.transforms._io import JsonFitted

KINDS = ("none", "log1p", "standard", "log1p_standard")


class DenseScaler(JsonFitted):
    """One dense feature's fitted scaling.

    Args:
        kind: one of :data:`KINDS`.
        mean, std: the fitted statistics (``standard`` kinds only).
    """

    def __init__(self, kind: str = "none", mean: float | None = None, std: float | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown dense transform {kind!r}; choose from {KINDS}")
        self.kind, self.mean, self.std = kind, mean, std

    @property
    def standard(self) -> bool:
        return self.kind.endswith("standard")

    def invalid(self, x: np.ndarray) -> np.ndarray:
        """Rows this transform cannot take (negative values under log1p), as a bool mask.

        Args:
            x: float64 values, empty values already 0.
        """
        return x < 0 if self.kind.startswith("log1p") else np.zeros(len(x), dtype=bool)

    def _pre(self, x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), 0.0, x.astype(np.float64))
        bad = self.invalid(x)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"log1p needs values >= 0: value {x[i]!r} at position {i}; {int(bad.sum())} such")
        return np.log1p(x) if self.kind.startswith("log1p") else x

    def fit(self, x: np.ndarray) -> "DenseScaler":
        """Mean and std of the (log1p'd) training values; a zero std becomes 1.

        Args:
            x: the training rows' values (NaN = empty -> 0).
        """
        if self.standard:
            v = self._pre(x)
            self.mean, std = float(v.mean()), float(v.std())
            self.std = std if std > 0 else 1.0
        return self

    def prepared(self, x: np.ndarray) -> np.ndarray:
        """The values :meth:`fit` takes statistics of (empty -> 0, then log1p if asked).

        Args:
            x: raw values (NaN = empty).
        """
        return self._pre(x)

    def fit_moments(self, n: int, mean: float, m2: float) -> "DenseScaler":
        """:meth:`fit` from the count, mean and summed squared deviations of :meth:`prepared`
        values (combined over blocks: :func:`combine_moments`); a zero std becomes 1.

        Args:
            n: values; mean: their mean; m2: sum of squared deviations from the mean.
        """
        if self.standard:
            std = float(np.sqrt(m2 / n)) if n else 0.0
            self.mean, self.std = float(mean), (std if std > 0 else 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """float32 scaled values.

        Args:
            x: raw values (NaN = empty -> 0).
        """
        v = self._pre(x)
        if self.standard:
            if self.mean is None or self.std is None:
                raise RuntimeError("DenseScaler: call fit() or load() first")
            v = (v - self.mean) / self.std
        return v.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """``{"transform": kind}`` plus ``mean``/``std`` when standardised (``dense_stats.json``)."""
        return {"transform": self.kind, **({"mean": self.mean, "std": self.std} if self.standard else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenseScaler":
        """The inverse of :meth:`to_dict`.

        Args:
            d: a :meth:`to_dict` result.
        """
        return cls(d["transform"], d.get("mean"), d.get("std"))


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, m2) of rows ``x`` (``[n]`` or ``[n, d]``): m2 is the summed squared deviations
    (``[d, d]`` outer products for rows of vectors), combined exactly by :func:`combine_moments`.

    Args:
        x: values or vectors (float64 is used).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mean = x.mean(axis=0) if n else np.zeros(x.shape[1:])
    xc = x - mean
    m2 = xc.T @ xc if x.ndim == 2 else np.asarray((xc * xc).sum())
    return n, mean, m2


def combine_moments(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """The moments of the union of the parts' rows (Chan et al.'s pairwise update).

    Args:
        parts: :func:`moments` results.
    """
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, np.array(mb, dtype=np.float64), np.array(m2b, dtype=np.float64)
            continue
        delta = mb - mean
        total = n + nb
        m2 = m2 + m2b + (np.multiply.outer(delta, delta) if np.ndim(delta) else delta * delta) * (n * nb / total)
        mean = mean + delta * (nb / total)
        n = total
    return n, mean, m2
