"""Side tables (WeChat's feed table): per key value (``feedid``) the encoded features of that
row and the raw columns history keys need (``authorid``). Joining rows to it gives every
missing key the OOV id, an empty list, a zero vector or 0.0.

Example:
    >>> import pyarrow as pa
    >>> t = SideTable("feedid", pa.array([7, 9]), pa.table({"authorid": [0, 1]}), fill={"authorid": 2})
    >>> t.transform(pa.array([9, 8]))["authorid"].to_pylist()
    [1, 2]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.transforms._io import read_table, write_table

_KEY = "_key"
_RAW = "_raw__"


class SideTable:
    """Encoded side rows keyed by the raw key.

    Args:
        key: the key column of the main rows (``feedid``).
        keys: raw key per side row.
        features: encoded feature columns per side row.
        fill: per sparse feature, the OOV id given to rows whose key is missing here.
        raw: raw columns kept for history keys (one value per side row).
    """

    def __init__(self, key: str, keys: pa.Array, features: pa.Table, fill: dict[str, int] | None = None,
                 raw: pa.Table | None = None) -> None:
        self.key, self.keys, self.features = key, keys, features
        self.fill = dict(fill or {})
        self.raw = raw if raw is not None else pa.table({})
        self._index: pd.Index | None = None

    @classmethod
    def fit(cls, key: str, keys: pa.Array, features: dict[str, pa.Array], fill: dict[str, int],
            raw: dict[str, pa.Array] | None = None) -> "SideTable":
        """Hold the side rows as encoded by the fitted vocabularies, scalers, list encoders and PCA.

        Args:
            key: key column; keys: its raw values per side row.
            features: encoded columns; fill: OOV id per sparse feature; raw: raw columns to keep.
        """
        return cls(key, keys, pa.table(features), fill, pa.table(raw or {}))

    def positions(self, values: pa.Array) -> pa.Array:
        """Side row per value (null where the key is not in the table).

        Args:
            values: raw keys of the main rows.
        """
        if values.type != self.keys.type:
            values = pc.cast(values, self.keys.type)
        if self._index is None:  # a hash table built once (pc.index_in rebuilds it per call: ms per request)
            self._index = pd.Index(self.keys.to_numpy(zero_copy_only=False))
        pos = self._index.get_indexer(values.to_numpy(zero_copy_only=False))
        return pa.array(pos, mask=pos < 0)

    def transform(self, values: pa.Array) -> dict[str, pa.Array]:
        """The encoded feature columns of the rows with these keys (missing keys filled).

        Args:
            values: raw keys of the main rows.
        """
        taken = self.features.take(self.positions(values))
        cols: dict[str, pa.Array] = {}
        for name in taken.column_names:
            col = taken[name].combine_chunks()
            if col.null_count:
                if name in self.fill:
                    col = pc.fill_null(col, self.fill[name])
                elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    col = pc.fill_null(col, pa.scalar([], col.type))
                elif pa.types.is_fixed_size_list(col.type):
                    col = pc.fill_null(col, pa.scalar([0.0] * col.type.list_size, col.type))
                else:
                    col = pc.fill_null(col, 0.0)
            cols[name] = col
        return cols

    def raw_values(self, values: pa.Array, column: str) -> np.ndarray:
        """A kept raw column for the rows with these keys (NaN/None where missing).

        Args:
            values: raw keys of the main rows; column: a raw column kept at fit.
        """
        pos = self.positions(values)
        return self.raw[column].combine_chunks().take(pos).to_numpy(zero_copy_only=False)

    def save(self, path: str | Path) -> None:
        """One Parquet file: the key, the features and the raw columns; key and fill in its metadata.

        Args:
            path: the file.
        """
        cols = {_KEY: self.keys, **{n: self.features[n] for n in self.features.column_names},
                **{_RAW + n: self.raw[n] for n in self.raw.column_names}}
        write_table(pa.table(cols), {"key": self.key, "fill": self.fill}, path)

    @classmethod
    def load(cls, path: str | Path) -> "SideTable":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        table, meta = read_table(path)
        feats = [n for n in table.column_names if n != _KEY and not n.startswith(_RAW)]
        raw = {n[len(_RAW):]: table[n].combine_chunks() for n in table.column_names if n.startswith(_RAW)}
        return cls(meta["key"], table[_KEY].combine_chunks(), pa.table({n: table[n].combine_chunks() for n in feats}),
                   {k: int(v) for k, v in meta["fill"].items()}, pa.table(raw))
