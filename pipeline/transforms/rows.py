"""The whole fitted feature pipeline of a preprocessed dataset: raw main rows (WeChat:
``userid, feedid, device`` and optionally ``date_``) -> the model-ready columns that
:mod:`pipeline.preprocess` writes, through the same fitted objects preprocess used.

Fitting is :func:`pipeline.preprocess.preprocess` (fitted on the training rows of a raw folder);
it saves a :class:`RowTransformer` under ``<processed>/artifacts/`` and
:meth:`RowTransformer.load` gives it back, e.g. to a served model.

Example:
    >>> # t = RowTransformer.load("data/wechat/artifacts")
    >>> # table = t.transform(pa.table({"userid": [1], "feedid": [2], "device": [1]}))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.transforms.dense import DenseScaler
from pipeline.transforms.history import HistoryGroup
from pipeline.transforms.side import SideTable
from pipeline.transforms.vocab import Vocabulary

LAYOUT = "transformer.json"
_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


class RowTransformer:
    """Raw rows -> model-ready columns.

    Args:
        inputs: the raw main-row columns a request needs and their kinds (``int``/``float``/``str``).
        sparse: main-row sparse features: name -> (column, vocabulary).
        dense: main-row dense features: name -> (column, scaler).
        sides: side tables joined on their key.
        history: history tables (their keys are main columns or raw columns of a side table).
        columns: the feature columns written, in order.
        time: the day column (None: no days); serve_day: the day of rows without one (the day
            after the last labelled day: history as of the end of the data).
        user, item: raw id columns copied to ``_user`` / ``_item``.
        unsupported: main-row list/vector features, which only preprocess can parse.
    """

    def __init__(self, inputs: dict[str, str], sparse: dict[str, tuple[str, Vocabulary]],
                 dense: dict[str, tuple[str, DenseScaler]], sides: list[SideTable], history: list[HistoryGroup],
                 columns: list[str], time: str | None = None, serve_day: int | None = None,
                 user: str | None = None, item: str | None = None, unsupported: list[str] | None = None) -> None:
        self.inputs, self.sparse, self.dense, self.sides, self.history = inputs, sparse, dense, sides, history
        self.columns, self.time, self.serve_day, self.user, self.item = columns, time, serve_day, user, item
        self.unsupported = list(unsupported or [])

    @property
    def meta_columns(self) -> list[str]:
        """``_user``, ``_item``, ``_day`` where configured."""
        return [m for m, c in (("_user", self.user), ("_item", self.item), ("_day", self.time)) if c is not None]

    def _raw(self, rows: pa.Table, column: str) -> pa.Array:
        col = rows[column].combine_chunks()
        kind = _TYPES.get(self.inputs.get(column, ""), None)
        return pc.cast(col, kind) if kind is not None and col.type != kind else col

    def key_values(self, rows: pa.Table, column: str) -> np.ndarray:
        """Per-row raw values of a history key (a main column, or a side table's raw column).

        Args:
            rows: raw rows; column: the key column.
        """
        if column in rows.column_names:
            return self._raw(rows, column).to_numpy(zero_copy_only=False)
        for side in self.sides:
            if column in side.raw.column_names:
                return side.raw_values(self._raw(rows, side.key), column)
        raise KeyError(f"history key {column!r} is neither a request column nor kept in a side table")

    def days(self, rows: pa.Table) -> np.ndarray:
        """Per-row day: the time column when the rows have it, else :attr:`serve_day`.

        Args:
            rows: raw rows.
        """
        if self.time is not None and self.time in rows.column_names:
            return self._raw(rows, self.time).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.full(rows.num_rows, -1 if self.serve_day is None else self.serve_day, dtype=np.int64)

    def transform(self, rows: pa.Table) -> pa.Table:
        """Model-ready columns (``_user``, ``_item``, ``_day`` then :attr:`columns`) of raw rows.

        Args:
            rows: a table with every column of :attr:`inputs` (the time column is optional).

        Raises:
            KeyError: a needed column is missing; ValueError: main-row list/vector features.
        """
        if self.unsupported:
            raise ValueError(f"main-row list/vector features {self.unsupported} cannot be transformed outside preprocess")
        missing = [c for c in self.inputs if c not in rows.column_names and c != self.time]
        if missing:
            raise KeyError(f"rows lack column(s) {missing}; needed: {sorted(self.inputs)}")
        cols: dict[str, pa.Array] = {}
        for name, (column, vocab) in self.sparse.items():
            cols[name] = pa.array(vocab.transform(self._raw(rows, column)))
        for name, (column, scaler) in self.dense.items():
            v = pc.cast(self._raw(rows, column), pa.float64()).to_numpy(zero_copy_only=False)
            cols[name] = pa.array(scaler.transform(v))
        for side in self.sides:
            cols.update(side.transform(self._raw(rows, side.key)))
        days = self.days(rows)
        for g in self.history:
            feats = g.transform([self.key_values(rows, k) for k in g.keys], days)
            cols[g.name] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
        if self.user is not None:
            cols["_user"] = self._raw(rows, self.user)
        if self.item is not None:
            cols["_item"] = self._raw(rows, self.item)
        if self.time is not None:
            cols["_day"] = pa.array(days)
        return pa.table({c: cols[c] for c in [*self.meta_columns, *self.columns]})

    def for_serving(self) -> "RowTransformer":
        """A copy whose history tables keep only the days rows on :attr:`serve_day` read (a
        served model sees no other day): smaller to ship and to load, same features on that day."""
        if self.serve_day is None or not self.history:
            return self
        first = self.serve_day - max(max(g.windows, default=0) for g in self.history)
        return RowTransformer(self.inputs, self.sparse, self.dense, self.sides, [g.since(first) for g in self.history],
                              self.columns, None, self.serve_day, self.user, self.item, self.unsupported)

    def save(self, folder: str | Path, history_files: list[str] | None = None) -> None:
        """``transformer.json`` plus one file per fitted object in ``folder``.

        Args:
            folder: a directory (created if needed); preprocess uses ``<processed>/artifacts``.
            history_files: the history tables' files, already written into ``folder`` (by the
                Ray tasks that built them, so they never pass through this process), in place of
                :attr:`history`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, (_, vocab) in self.sparse.items():
            vocab.save(folder / f"vocab_{name}.parquet")
        for i, side in enumerate(self.sides):
            side.save(folder / f"side_{i}_{side.key}.parquet")
        if history_files is None:
            for g in self.history:
                g.save(folder / f"history_{g.name}.npz")
            history_files = [f"history_{g.name}.npz" for g in self.history]
        layout = {
            "inputs": self.inputs, "columns": self.columns, "time": self.time, "serve_day": self.serve_day,
            "user": self.user, "item": self.item, "unsupported": self.unsupported,
            "sparse": {n: c for n, (c, _) in self.sparse.items()},
            "dense": {n: {"column": c, **s.to_dict()} for n, (c, s) in self.dense.items()},
            "sides": [f"side_{i}_{s.key}.parquet" for i, s in enumerate(self.sides)],
            "history": history_files,
        }
        (folder / LAYOUT).write_text(json.dumps(layout, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "RowTransformer":
        """Read what :meth:`save` wrote.

        Args:
            folder: the directory.
        """
        folder = Path(folder)
        lay: dict[str, Any] = json.loads((folder / LAYOUT).read_text())
        sparse = {n: (c, Vocabulary.load(folder / f"vocab_{n}.parquet")) for n, c in lay["sparse"].items()}
        dense = {n: (d["column"], DenseScaler.from_dict(d)) for n, d in lay["dense"].items()}
        return cls(lay["inputs"], sparse, dense, [SideTable.load(folder / f) for f in lay["sides"]],
                   [HistoryGroup.load(folder / f) for f in lay["history"]], lay["columns"], lay["time"],
                   lay["serve_day"], lay["user"], lay["item"], lay["unsupported"])
