"""Vocabularies: the ids seen in training rows -> ``0..V-1``; anything else (an unseen id, a
null) -> ``V``, the OOV row of :class:`mtl.inputs.InputModule`.

Example:
    >>> import pyarrow as pa
    >>> v = Vocabulary().fit(pa.array([30, 10, 30]))
    >>> v.transform(pa.array([10, 30, 99, None])).tolist()
    [0, 1, 2, 2]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class Vocabulary:
    """Sorted distinct training values; :meth:`transform` maps values to their index.

    Args:
        values: the fitted values (sorted, distinct), or None before :meth:`fit`.
    """

    def __init__(self, values: pa.Array | None = None) -> None:
        self.values = values
        self._index: pd.Index | None = None

    @property
    def size(self) -> int:
        """V, the number of known ids (the OOV id)."""
        return len(self._fitted())

    def _fitted(self) -> pa.Array:
        if self.values is None:
            raise RuntimeError("Vocabulary: call fit() or load() first")
        return self.values

    def fit(self, values: pa.Array) -> "Vocabulary":
        """Learn the distinct non-null ``values`` (the training rows' ids).

        Args:
            values: ids of the training rows.
        """
        uniq = pc.unique(values.drop_null())
        self.values, self._index = uniq.take(pc.sort_indices(uniq)), None
        return self

    def transform(self, values: pa.Array) -> np.ndarray:
        """int64 ids in ``0..V-1``; unseen and null -> ``V``.

        Args:
            values: raw ids of the vocabulary's type (or castable to it).
        """
        vocab = self._fitted()
        if values.type != vocab.type:
            try:
                values = pc.cast(values, vocab.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"values of type {values.type} do not fit a vocabulary of {vocab.type} "
                                 f"(e.g. string tokens for an id list fitted with integer ids)") from None
        if self._index is None or len(self._index) != len(vocab):  # a hash table built once, not per call
            self._index = pd.Index(vocab.to_numpy(zero_copy_only=False))
        idx = self._index.get_indexer(values.to_numpy(zero_copy_only=False))  # -1: unseen or null
        return np.where(idx < 0, len(vocab), idx).astype(np.int64)

    def save(self, path: str | Path) -> None:
        """Write a Parquet file with one column ``value``.

        Args:
            path: the file.
        """
        pq.write_table(pa.table({"value": self._fitted()}), path)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        return cls(pq.read_table(path)["value"].combine_chunks())
