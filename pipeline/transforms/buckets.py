"""Quantile bin edges of dense features, fitted on training rows: what the model's numeric
embeddings (:mod:`mtl.numeric`: ``bucket`` and ``piecewise_linear``) read from the feature spec.

One :class:`QuantileBoundaries` per dense feature (each component binned on its own); the edges
are the ``0, 1/bins, ..., 1`` quantiles of the training values as written by preprocessing
(after scaling, so the model's input and the edges share a scale). A repeated quantile (a
value held by many rows, e.g. zero counts) is kept: every component has ``bins + 1`` edges.

Example:
    >>> import numpy as np
    >>> q = QuantileBoundaries(bins=2).fit(np.array([[0.0], [1.0], [2.0], [3.0], [4.0]]))
    >>> q.edges.tolist()
    [[0.0, 2.0, 4.0]]
    >>> q.transform(np.array([[-1.0], [1.5], [9.0]])).tolist()
    [[0], [1], [3]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtl.features import FeatureSpec
from pipeline.transforms._io import JsonFitted


class QuantileBoundaries(JsonFitted):
    """Per-component quantile bin edges of one dense feature.

    Args:
        bins: number of quantile bins (``bins + 1`` edges per component).
        edges: fitted edges ``[dim, bins + 1]`` (from :meth:`fit` or :meth:`load`).
    """

    def __init__(self, bins: int = 16, edges: np.ndarray | None = None) -> None:
        if bins < 1:
            raise ValueError(f"QuantileBoundaries: bins must be >= 1, got {bins}")
        self.bins = bins
        self.edges = None if edges is None else np.asarray(edges, dtype=np.float64)

    def fit(self, x: np.ndarray) -> "QuantileBoundaries":
        """Edges from the training rows' values.

        Args:
            x: ``[N]`` or ``[N, dim]`` training values (finite).
        """
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if len(x) == 0:
            raise ValueError("QuantileBoundaries: no training rows to fit")
        if not np.isfinite(x).all():
            raise ValueError("QuantileBoundaries: non-finite training values")
        self.edges = np.quantile(x, np.linspace(0.0, 1.0, self.bins + 1), axis=0).T  # [dim, bins+1]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Bucket ids ``[N, dim]``: the number of edges strictly below each value (``0`` at or
        below the smallest training value, ``bins + 1`` above the largest), as
        ``mtl.numeric``'s ``bucket`` encoding computes them.

        Args:
            x: ``[N]`` or ``[N, dim]`` values.
        """
        if self.edges is None:
            raise RuntimeError("QuantileBoundaries: call fit() or load() first")
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return (x[:, :, None] > self.edges[None]).sum(-1).astype(np.int64)

    def to_list(self) -> list[list[float]]:
        """The edges as JSON-able lists (the feature spec's ``boundaries``)."""
        if self.edges is None:
            raise RuntimeError("QuantileBoundaries: call fit() or load() first")
        return [[float(v) for v in row] for row in self.edges]

    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "edges": self.to_list()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantileBoundaries":
        return cls(int(d["bins"]), np.asarray(d["edges"], dtype=np.float64))


def fit_numeric_boundaries(spec: FeatureSpec, train_dir: Path, bins: int, artifacts: Path) -> FeatureSpec:
    """Fit :class:`QuantileBoundaries` for every dense feature of ``spec`` (history counts and
    rates included) on the written training split, save each as
    ``artifacts/bins_<feature>.json`` and return the spec with the features' ``boundaries``.

    Args:
        spec: the :class:`~mtl.features.FeatureSpec` of the preprocessed data.
        train_dir: the ``train`` split folder (Parquet files: training rows only).
        bins: quantile bins per component.
        artifacts: the fitted transforms' folder.
    """
    import pyarrow.parquet as pq

    files = sorted(Path(train_dir).glob("*.parquet"))
    names = [f.name for f in spec.dense]
    if not names:
        return spec
    table = pq.read_table(files, columns=names) if files else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"{train_dir}: no training rows to fit numeric_bins on")
    fitted = {f.name: QuantileBoundaries(bins).fit(np.asarray(feature_matrix(table[f.name], f.dim), dtype=np.float64))
              for f in spec.dense}
    return with_boundaries(spec, fitted, artifacts)


def feature_matrix(col: Any, dim: int) -> np.ndarray:
    """``[N, dim]`` values of a written dense feature column (a fixed-size list when ``dim > 1``),
    in the column's own float type.

    Args:
        col: a pyarrow (chunked) array; dim: the feature's width.
    """
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    flat = col.flatten() if dim > 1 else col
    return flat.to_numpy(zero_copy_only=False).reshape(len(col), dim)


def with_boundaries(spec: FeatureSpec, fitted: dict[str, QuantileBoundaries], artifacts: Path) -> FeatureSpec:
    """Save each fitted feature's edges as ``artifacts/bins_<feature>.json``; the spec with
    the dense features' ``boundaries``.

    Args:
        spec: the feature spec; fitted: per dense feature, its edges; artifacts: the folder.
    """
    import dataclasses

    dense = []
    for f in spec.dense:
        fitted[f.name].save(Path(artifacts) / f"bins_{f.name}.json")
        dense.append(dataclasses.replace(f, boundaries=fitted[f.name].to_list()))
    return dataclasses.replace(spec, dense=dense)


# --------------------------------------------------------------------------------------------
# the same edges from parts of the rows (distributed): exact order statistics in two passes


HIST_BITS = 12  # a value's first pass bucket: the top bits of its order key (sign, exponent, 3 mantissa bits)


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the float values (float32 -> uint32, float64 ->
    uint64); ``-0.0`` is keyed as ``0.0``.

    Args:
        values: finite floats.
    """
    v = np.asarray(values)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    v = v + v.dtype.type(0.0)  # -0.0 + 0.0 == +0.0: one key for both zeros
    utype = np.uint32 if v.dtype == np.float32 else np.uint64
    bits = v.view(utype)
    sign = utype(1) << utype(8 * v.dtype.itemsize - 1)
    return np.where(bits & sign, ~bits, bits | sign)


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def _buckets(values: np.ndarray) -> np.ndarray:
    keys = order_keys(values)
    return (keys >> keys.dtype.type(8 * keys.dtype.itemsize - HIST_BITS)).astype(np.int64)


def bucket_counts(x: np.ndarray) -> np.ndarray:
    """First pass over a part of the training rows: ``[dim, 2**HIST_BITS]`` counts of each
    component's values per bucket (summed over parts, they place every rank in one bucket).

    Args:
        x: ``[N]`` or ``[N, dim]`` finite values of one feature.

    Raises:
        ValueError: a non-finite value (as :meth:`QuantileBoundaries.fit`).
    """
    x = _as_2d(x)
    if not np.isfinite(x).all():
        raise ValueError("QuantileBoundaries: non-finite training values")
    width = 1 << HIST_BITS
    at = _buckets(x) + np.arange(x.shape[1], dtype=np.int64) * width
    return np.bincount(at.reshape(-1), minlength=x.shape[1] * width).reshape(x.shape[1], width)


def quantile_ranks(n: int, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranks (0-based, in sorted order) ``np.quantile``'s default (linear) method reads for
    the ``0, 1/bins, ..., 1`` quantiles of ``n`` values, and the interpolation weights.

    Returns:
        ``(lower, upper, gamma)``, each ``[bins + 1]``.
    """
    virtual = (n - 1) * np.linspace(0.0, 1.0, bins + 1)
    lower = np.floor(virtual)
    upper = lower + 1
    top = virtual >= n - 1
    lower[top] = n - 1
    upper[top] = n - 1
    gamma = virtual - np.floor(virtual)
    return lower.astype(np.int64), upper.astype(np.int64), gamma


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``np.quantile``'s interpolation between neighbouring order statistics, operation for
    operation (so the edges are bit-identical to it)."""
    diff = b - a
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


def wanted_buckets(counts: np.ndarray, bins: int) -> tuple[int, list[np.ndarray]]:
    """From the summed first-pass counts of one feature: the number of rows, and per component
    the buckets holding the ranks the edges read (what the second pass collects)."""
    n = int(counts[0].sum())
    if n == 0:
        raise ValueError("no training rows to fit numeric_bins on")
    lower, upper, _ = quantile_ranks(n, bins)
    ranks = np.unique(np.concatenate([lower, upper]))
    ends = np.cumsum(counts, axis=1)
    return n, [np.unique(np.searchsorted(ends[j], ranks, side="right")) for j in range(counts.shape[0])]


def bucket_values(x: np.ndarray, wanted: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Second pass over a part of the rows: per component, the distinct values in its wanted
    buckets and how often each occurs (few: a bucket is a narrow value range).

    Args:
        x: ``[N]`` or ``[N, dim]`` values of one feature; wanted: :func:`wanted_buckets`.
    """
    x = _as_2d(x)
    out = []
    for j, buckets in enumerate(wanted):
        col = x[:, j]
        picked = col[np.isin(_buckets(col), buckets)].astype(np.float64) + 0.0
        out.append(np.unique(picked, return_counts=True))
    return out


def boundaries_from_parts(counts: np.ndarray, parts: list[list[tuple[np.ndarray, np.ndarray]]],
                          bins: int) -> "QuantileBoundaries":
    """The :class:`QuantileBoundaries` that :meth:`QuantileBoundaries.fit` gives on all the
    rows, from the summed first-pass counts and every part's second-pass values.

    Args:
        counts: summed :func:`bucket_counts` ``[dim, 2**HIST_BITS]``.
        parts: per part of the rows, :func:`bucket_values` with :func:`wanted_buckets`.
        bins: quantile bins.
    """
    n, wanted = wanted_buckets(counts, bins)
    lower, upper, gamma = quantile_ranks(n, bins)
    starts = np.cumsum(counts, axis=1) - counts  # rows below each bucket
    edges = np.zeros((counts.shape[0], bins + 1), dtype=np.float64)
    for j in range(counts.shape[0]):
        values, inv = np.unique(np.concatenate([p[j][0] for p in parts]), return_inverse=True)
        seen = np.bincount(inv.reshape(-1), weights=np.concatenate([p[j][1] for p in parts]),
                           minlength=len(values)).astype(np.int64)
        ends = np.cumsum(seen)  # the wanted buckets' values in order: rank within them

        def order_stat(rank: np.ndarray) -> np.ndarray:
            bucket = np.searchsorted(np.cumsum(counts[j]), rank, side="right")
            # rows of the wanted buckets below this bucket, then the rank inside it
            below_wanted = np.array([counts[j][wanted[j][wanted[j] < b]].sum() for b in bucket], dtype=np.int64)
            inside = rank - starts[j][bucket] + below_wanted
            return values[np.searchsorted(ends, inside, side="right")]

        edges[j] = lerp(order_stat(lower), order_stat(upper), gamma)
    return QuantileBoundaries(bins, edges)
