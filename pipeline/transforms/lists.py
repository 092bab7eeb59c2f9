"""Lists of ids or string tokens (``"12;7;33"`` parsed to ``list<int64>``, ``"Comedy|Romance"``
to ``list<string>``): truncated to ``max_len`` entries, then encoded with a
:class:`~pipeline.transforms.vocab.Vocabulary` fitted on the truncated lists of training rows
(unseen entries -> ``V``); weights (``"id w;id w"`` lists) are truncated alike.

Example:
    >>> import pyarrow as pa
    >>> enc = ListEncoder(max_len=2).fit(pa.array([[5, 6, 7], [6]]))
    >>> enc.transform(pa.array([[6, 5, 9], []]))[0].to_pylist()
    [[1, 0], []]
    >>> genres = ListEncoder(max_len=3).fit(pa.array([["Comedy", "Romance"], ["Drama"]]))
    >>> genres.transform(pa.array([["Romance", "Horror"]]))[0].to_pylist()
    [[2, 3]]
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.transforms._io import read_table, write_table
from pipeline.transforms.vocab import Vocabulary


class ListEncoder:
    """One list feature's truncation and vocabulary.

    Args:
        max_len: entries kept per row (longer lists are cut).
        vocab: the fitted vocabulary, or None before :meth:`fit`.
    """

    def __init__(self, max_len: int, vocab: Vocabulary | None = None) -> None:
        self.max_len = max_len
        self.vocab = vocab or Vocabulary()

    @property
    def size(self) -> int:
        return self.vocab.size

    def truncate(self, lists: pa.Array) -> pa.Array:
        """The first ``max_len`` entries of every row.

        Args:
            lists: a list array (ids or weights).
        """
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        return pc.list_slice(lists, 0, self.max_len) if (lengths > self.max_len).any() else lists

    def fit(self, ids: pa.Array) -> "ListEncoder":
        """Learn the ids of the (truncated) training rows' lists.

        Args:
            ids: ``list<int64>`` or ``list<string>`` of the training rows.
        """
        self.vocab.fit(pc.list_flatten(self.truncate(ids)))
        return self

    def transform(self, ids: pa.Array, weights: pa.Array | None = None) -> tuple[pa.Array, pa.Array | None]:
        """Truncated, encoded ids (unseen -> ``V``) and the truncated weights.

        Args:
            ids: ``list<int64>`` or ``list<string>`` per row, of the fitted entries' kind.
            weights: ``list<float32>`` of the same shape, or None.
        """
        ids = self.truncate(ids)
        enc = pa.ListArray.from_arrays(ids.offsets, pa.array(self.vocab.transform(pc.list_flatten(ids))))
        return enc, (self.truncate(weights) if weights is not None else None)

    def save(self, path: str | Path) -> None:
        """The vocabulary's Parquet file (column ``value``) with ``max_len`` in its metadata.

        Args:
            path: the file.
        """
        write_table(pa.table({"value": self.vocab._fitted()}), {"max_len": self.max_len}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ListEncoder":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        table, meta = read_table(path)
        return cls(int(meta["max_len"]), Vocabulary(table["value"].combine_chunks()))
