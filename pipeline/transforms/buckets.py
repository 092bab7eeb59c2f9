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
    import dataclasses

    import pyarrow.parquet as pq

    files = sorted(Path(train_dir).glob("*.parquet"))
    names = [f.name for f in spec.dense]
    if not names:
        return spec
    table = pq.read_table(files, columns=names) if files else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"{train_dir}: no training rows to fit numeric_bins on")
    dense = []
    for f in spec.dense:
        col = table[f.name].combine_chunks()
        values = np.asarray(col.flatten() if f.dim > 1 else col, dtype=np.float64).reshape(table.num_rows, f.dim)
        q = QuantileBoundaries(bins).fit(values)
        q.save(Path(artifacts) / f"bins_{f.name}.json")
        dense.append(dataclasses.replace(f, boundaries=q.to_list()))
    return dataclasses.replace(spec, dense=dense)
