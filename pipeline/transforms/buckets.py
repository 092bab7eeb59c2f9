"""Quantile bin edges of dense features, fitted on training rows: what the model's numeric
embeddings (:mod:`mtl.numeric`: ``bucket`` and ``piecewise_linear``) read from the feature spec.

One :class:`QuantileBoundaries` per dense feature (each component binned on its own); the edges
are the ``0, 1/bins, ..., 1`` quantiles of the training values as written by preprocessing
(after scaling, so the model's input and the edges share a scale), made tie-aware
(:func:`tie_aware_edges`): a value held by many rows (zero counts; Adult's capital gain, 92%
zeros) takes one edge, and the bins it would have filled with repeats go to the other values, so
a feature that is mostly one value is still resolved where it varies. Every component has
``bins + 1`` edges (with fewer distinct values than that, the largest edge repeats).

The algorithm is written once, over two questions about the sorted values (the value at a rank;
how many values lie below and at a value): in memory (:func:`tie_aware_quantiles`) they are
answered from the sorted array, in the distributed builder (:func:`edges_from_parts`) from
per-bucket counts and the values of the buckets asked for, collected in passes over the written
training files, so both give bit-identical edges.

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
from collections.abc import Callable
from typing import Any

import numpy as np

from mtl.features import FeatureSpec
from pipeline.transforms._io import JsonFitted


def tie_aware_edges(n: int, bins: int, order_stats: Callable[[np.ndarray], np.ndarray],
                    below_and_at: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``bins + 1`` sorted edges of ``n`` values: their ``0, 1/bins, ..., 1`` quantiles (numpy's
    linear method) when no quantile repeats; otherwise the distinct quantiles, then, while edges
    are missing, the evenly spaced interior quantiles of the values that are not yet an edge (mass
    points removed). With fewer distinct values than bins the largest edge repeats.

    Args:
        n: number of values (>= 1).
        bins: number of bins.
        order_stats: ranks (0-based, in sorted order) -> the values there.
        below_and_at: values -> how many of the ``n`` values lie strictly below each, and how many
            equal it (asked only for values between neighbouring order statistics it returned).
    """
    lower, upper, gamma = quantile_ranks(n, np.linspace(0.0, 1.0, bins + 1))
    edges = np.unique(lerp(order_stats(lower), order_stats(upper), gamma))
    while len(edges) < bins + 1:
        below, at = below_and_at(edges)
        rest = n - int(at.sum())
        if rest == 0:
            break
        missing = bins + 1 - len(edges)
        lower, upper, gamma = quantile_ranks(rest, np.linspace(0.0, 1.0, missing + 2)[1:-1])
        # a rank among the values that are not edges -> among all: skip the edges' runs below it
        run_starts = below - (np.cumsum(at) - at)  # where each edge's run would begin among the rest
        skipped = np.concatenate([[0], np.cumsum(at)])

        def full(rank: np.ndarray) -> np.ndarray:
            return rank + skipped[np.searchsorted(run_starts, rank, side="right")]

        grown = np.unique(np.concatenate([edges, lerp(order_stats(full(lower)), order_stats(full(upper)), gamma)]))
        if len(grown) == len(edges):
            break
        edges = grown
    return np.concatenate([edges, np.full(bins + 1 - len(edges), edges[-1])])


def tie_aware_quantiles(values: np.ndarray, bins: int) -> np.ndarray:
    """:func:`tie_aware_edges` of values in memory.

    Args:
        values: ``[N]`` finite training values (N >= 1).
        bins: number of bins.

    Example:
        >>> tie_aware_quantiles(np.array([0.0] * 8 + [1.0, 2.0, 3.0, 4.0]), 4).tolist()
        [0.0, 1.25, 1.6666666666666665, 2.333333333333333, 4.0]
    """
    x = np.sort(np.asarray(values, dtype=np.float64) + 0.0)  # -0.0 as 0.0, as the distributed fit

    def below_and_at(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(x, v, side="left"), np.searchsorted(x, v, side="right")
        return lo, hi - lo

    return tie_aware_edges(len(x), bins, lambda r: x[r], below_and_at)


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
        self.edges = np.stack([tie_aware_quantiles(x[:, j], self.bins) for j in range(x.shape[1])])  # [dim, bins+1]
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
# the same edges from parts of the rows (distributed): bucket counts, then rounds that collect
# the values of the buckets the order statistics fall in


NEAR = 2  # buckets either side of a likely one that the first round collects as well
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


def quantile_ranks(n: int, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranks (0-based, in sorted order) ``np.quantile``'s default (linear) method reads for
    the quantiles ``probs`` of ``n`` values, and the interpolation weights.

    Returns:
        ``(lower, upper, gamma)``, each like ``probs``.
    """
    virtual = (n - 1) * np.asarray(probs, dtype=np.float64)
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


def first_wanted(counts: np.ndarray, bins: int) -> list[np.ndarray]:
    """From the summed first-pass counts of one feature: per component, the buckets the first
    second-pass round collects: those holding the plain quantiles' ranks, and those that
    :func:`tie_aware_edges` will probably ask for next (its run on the buckets themselves, each
    taken for one value, plus their neighbours), so that a feature with mass points usually needs
    no further round.

    Raises:
        ValueError: no rows.
    """
    n = int(counts[0].sum())
    if n == 0:
        raise ValueError("no training rows to fit numeric_bins on")
    return [_likely_buckets(counts[j], bins) for j in range(counts.shape[0])]


def _likely_buckets(counts: np.ndarray, bins: int) -> np.ndarray:
    """:func:`tie_aware_edges` run with bucket ids for values (a bucket as one value): the
    buckets it reads, and their neighbours that hold rows."""
    ends = np.cumsum(counts)
    starts = ends - counts
    asked: list[np.ndarray] = []

    def order_stats(ranks: np.ndarray) -> np.ndarray:
        bucket = np.searchsorted(ends, ranks, side="right")
        asked.append(bucket)
        return bucket.astype(np.float64)

    def below_and_at(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        whole = v == np.floor(v)
        b = np.floor(v).astype(np.int64)
        return np.where(whole, starts[b], ends[b]), np.where(whole, counts[b], 0)

    tie_aware_edges(int(ends[-1]), bins, order_stats, below_and_at)
    found = np.unique(np.concatenate(asked))
    near = np.unique((found[:, None] + np.arange(-NEAR, NEAR + 1)).reshape(-1))
    near = near[(near >= 0) & (near < len(counts))]
    return near[counts[near] > 0]


Collected = tuple[np.ndarray, np.ndarray, np.ndarray]  # sorted distinct values, their counts, their buckets


def bucket_values(x: np.ndarray, wanted: list[np.ndarray]) -> list[Collected]:
    """Second pass over a part of the rows: per component, the distinct values in its wanted
    buckets, how often each occurs and its bucket (few: a bucket is a narrow value range).

    Args:
        x: ``[N]`` or ``[N, dim]`` values of one feature; wanted: per component, bucket ids.
    """
    x = _as_2d(x)
    out = []
    for j, buckets in enumerate(wanted):
        # distinct values first, in the column's own float type (a float32 sort is fast, and most
        # features repeat values), then keep those of the wanted buckets; -0.0 and 0.0 are one
        values, counts = np.unique(x[:, j], return_counts=True)
        bucket = _buckets(values)
        keep = np.isin(bucket, buckets)
        out.append((values[keep].astype(np.float64) + 0.0, counts[keep].astype(np.int64), bucket[keep]))
    return out


def merge_collected(parts: list[Collected]) -> Collected:
    """One :data:`Collected` from several (parts of the rows, rounds of buckets)."""
    values, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    counts = np.bincount(inv.reshape(-1), weights=np.concatenate([p[1] for p in parts]), minlength=len(values))
    buckets = np.zeros(len(values), dtype=np.int64)
    buckets[inv.reshape(-1)] = np.concatenate([p[2] for p in parts])
    return values, counts.astype(np.int64), buckets


class MissingBuckets(Exception):
    """An order statistic lies in a bucket whose values were not collected yet."""

    def __init__(self, buckets: np.ndarray) -> None:
        super().__init__(f"{len(buckets)} bucket(s) not collected")
        self.buckets = buckets


class _PartsOracle:
    """The two questions of :func:`tie_aware_edges` about one component's values, answered from
    its bucket counts and the collected values of some buckets (:class:`MissingBuckets` when
    an answer needs a bucket not collected)."""

    def __init__(self, counts: np.ndarray, collected: Collected) -> None:
        self.counts = counts.astype(np.int64)
        self.ends = np.cumsum(self.counts)
        self.starts = self.ends - self.counts  # rows below each bucket
        self.values, self.value_counts, self.value_buckets = collected
        # a collected bucket always holds values (only buckets with rows are asked for)
        self.have = np.unique(self.value_buckets)
        have_rows = self.counts[self.have]
        self.have_below = np.cumsum(have_rows) - have_rows  # collected rows in collected buckets below
        self.value_ends = np.cumsum(self.value_counts)

    def _collected_below(self, bucket: np.ndarray) -> np.ndarray:
        return self.have_below[np.searchsorted(self.have, bucket)]

    def order_stats(self, ranks: np.ndarray) -> np.ndarray:
        bucket = np.searchsorted(self.ends, ranks, side="right")
        missing = np.setdiff1d(bucket, self.have)
        if missing.size:
            raise MissingBuckets(missing)
        inside = ranks - self.starts[bucket] + self._collected_below(bucket)
        return self.values[np.searchsorted(self.value_ends, inside, side="right")]

    def _rank_of(self, i: np.ndarray) -> np.ndarray:
        """The rank of the first occurrence of collected value ``i``."""
        b = self.value_buckets[i]
        return self.starts[b] + (self.value_ends[i] - self.value_counts[i]) - self._collected_below(b)

    def below_and_at(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(self.values, v, side="left")
        hit = (i < len(self.values)) & (self.values[np.minimum(i, len(self.values) - 1)] == v)
        below, at = np.zeros(len(v), dtype=np.int64), np.zeros(len(v), dtype=np.int64)
        below[hit], at[hit] = self._rank_of(i[hit]), self.value_counts[i[hit]]
        # a value between two collected neighbours with no row between them (an interpolated
        # quantile): the rows below it are the rows up to the lower neighbour
        for k in np.flatnonzero(~hit):
            prev_end = self._rank_of(i[k] - 1) + self.value_counts[i[k] - 1] if i[k] > 0 else None
            next_start = self._rank_of(i[k]) if i[k] < len(self.values) else int(self.ends[-1])
            if prev_end is None or prev_end != next_start:
                raise RuntimeError("numeric_bins: a value that is not between neighbouring order statistics")
            below[k] = next_start
        return below, at


def edges_from_parts(counts: np.ndarray, collected: list[Collected],
                     bins: int) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Per component, :func:`tie_aware_edges` from the summed first-pass counts and the values
    of the buckets collected so far: the edges ``[dim, bins + 1]``, or ``None`` and per component
    the buckets still to collect (another second-pass round).

    Args:
        counts: summed :func:`bucket_counts` ``[dim, 2**HIST_BITS]``.
        collected: per component, the values of the buckets collected so far
            (:func:`merge_collected` of every part's :func:`bucket_values`).
        bins: quantile bins.
    """
    n = int(counts[0].sum())
    edges, missing = [], []
    for j in range(counts.shape[0]):
        oracle = _PartsOracle(counts[j], collected[j])
        try:
            edges.append(tie_aware_edges(n, bins, oracle.order_stats, oracle.below_and_at))
            missing.append(np.zeros(0, dtype=np.int64))
        except MissingBuckets as exc:
            missing.append(exc.buckets)
    if any(m.size for m in missing):
        return None, missing
    return np.stack(edges), missing
