"""Parquet files with a small JSON record in their schema metadata (the fitted objects' files)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_KEY = b"mtlrank"


class JsonFitted(ABC):
    """``save``/``load`` of a fitted object as the JSON of its ``to_dict``/``from_dict``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The fitted state as plain JSON values."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """The object :meth:`to_dict` describes."""

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly).

        Args:
            path: the file.
        """
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        return cls.from_dict(json.loads(Path(path).read_text()))


def write_table(table: pa.Table, meta: dict[str, Any], path: str | Path) -> None:
    """Write ``table`` with ``meta`` (JSON) in its schema metadata.

    Args:
        table: the columns; meta: a JSON-able dict; path: the file.
    """
    pq.write_table(table.replace_schema_metadata({_KEY: json.dumps(meta)}), path)


def read_table(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """A file :func:`write_table` wrote: the table (one chunk per column) and its record.

    Args:
        path: the file.
    """
    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(_KEY)
    if meta is None:
        raise ValueError(f"{path}: not a fitted-transform file (no {_KEY.decode()} metadata)")
    return table.combine_chunks(), json.loads(meta)
