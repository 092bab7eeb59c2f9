"""Raw logs -> model-ready Parquet + ``feature_spec.json``, on Ray Data.

``python -m pipeline preprocess --raw DIR --out DIR [--config configs/datasets/wechat.yaml]
[--set key=value ...]``

What a :class:`pipeline.datasets.DatasetConfig` describes is done in this order:

1. read every file (type-checked; a missing file/column, a wrong type, an empty file, NaN or
   an empty required value is an error naming file, column and row — ``row`` is the 1-based
   data row, ``line`` = row + 1 in a CSV with its header);
2. check labels (0/1 only, or derived from ``positive`` values), de-duplicate main rows
   (``keep`` last/first/all, count reported), append extra unlabelled rows (``test_a.csv``);
3. join side tables on their key (a key missing there is an error unless ``on_missing: null``);
4. assign splits (by time ranges, seeded random fractions, or fractions ordered by time);
5. fit on training rows only: vocabularies (ids to ``0..V-1``; anything else -> ``V``, the
   OOV row of :class:`mtl.inputs.InputModule`, counted per split), dense standardisation,
   PCA of vectors (on the distinct training items), list vocabularies;
6. history features from strictly earlier times (days or seconds: ``time_unit``): per key group
   and window ``w`` the impressions and action counts/rates over times ``t-w .. t-1``, from the
   labelled rows the ``history.protocol`` allows (``online``: all; ``train_only``: none of the
   valid/test rows), recorded in ``report.json``;
7. optional per-action negative down-sampling of training rows (seeded, row-hash based);
8. Ray Data: per block, join the encoded side tables, look up history windows and write
   Parquet (``train/``, ``valid/``, ``test/``);
9. ``feature_spec.json`` (:class:`mtl.features.FeatureSpec`), ``report.json``, fitted
   vocabularies/PCA under ``artifacts/``, ``_PREPROCESSED.json`` (this tool's mark) and
   ``_SUCCESS``; built in a temporary directory next to ``--out`` and swapped in under a lock
   (:mod:`pipeline.publish`), so partial output never looks complete, a second run into the
   same ``--out`` fails at once, and only a folder this tool wrote is ever replaced.

A raw folder holding the generator's ``_GENERATED.json`` must match it (size and SHA-256 of
each file read): a folder mixing two generated datasets is an error.

Two builders produce the same output: the default one (:mod:`pipeline.preprocess_dist`) reads,
checks and aggregates in Ray tasks and keeps only fitted objects and small tables in the driver;
:func:`build_reference` (``--engine reference``) does steps 1-7 with vectorised Arrow/NumPy over
the whole log in the driver and only step 8 in Ray Data ``map_batches`` tasks. The reference is
what the distributed builder is tested against, and it words the error when that builder finds
bad input. This module holds the readers, parsers and checks both use.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl.features import WEIGHT_SUFFIX, DenseFeature, FeatureSpec, ListFeature, SparseFeature, VectorFeature
from pipeline.config import dump_config, load_config
from pipeline.datasets import TIME_UNIT_SUFFIX, DatasetConfig, FileConfig, ListConfig, VectorConfig
from pipeline.errors import ConfigError, DataError
from pipeline.publish import check_digests, publishing
from pipeline.ray_runtime import ensure_ray
from pipeline.transforms import (  # noqa: F401  (HistoryGroup, fit_pca, ...: this module's API before the move)
    PCA,
    DenseScaler,
    HistoryGroup,
    ListEncoder,
    RowTransformer,
    SideTable,
    Vocabulary,
    build_history_group,
    fit_pca,
    history_feature_names,
    history_features,
)
from pipeline.transforms.buckets import fit_numeric_boundaries

SPLITS = ("train", "valid", "test")
SUCCESS = "_SUCCESS"
GENERATED_MANIFEST = "_GENERATED.json"  # pipeline.generate.MANIFEST (not imported: a heavy module)
MASK_PREFIX = "_mask__"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "datasets" / "wechat.yaml"
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
_INT_RE = r"^[+-]?[0-9]+$"
_INT_FLOAT_RE = r"^[+-]?[0-9]+\.0*$"  # "123.0": an integer written by a float writer
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$|^[+-]?(nan|NaN|inf|Inf|infinity|Infinity)$"


# --------------------------------------------------------------------------------------------
# reading


def _line_of(path: Path, row: int) -> int | None:
    """The file line (1-based) of data row ``row`` of a CSV, None if unknown.

    The CSV reader skips empty lines, so after one the line is not ``row + 1``. Only called
    to word an error message, so scanning the file is affordable."""
    seen = -1  # data rows seen; -1 until the header
    try:
        with path.open("rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line in (b"\n", b"\r\n"):
                    continue
                seen += 1
                if seen == row:
                    return line_no
    except OSError:
        return None
    return None


def _where(path: Path | str, column: str | None, row: int | None, csv_file: bool | None = None) -> str:
    """``file: column 'c', row r (line l)``; ``line`` only for CSV files (default: by suffix)."""
    path = Path(path)
    out = f"{path}"
    if column is not None:
        out += f": column {column!r}"
    if row is not None:
        out += f", row {row}"
        line = _line_of(path, row) if (path.suffix != ".parquet" if csv_file is None else csv_file) else None
        out += f" (line {line})" if line is not None else ""
    return out


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class RowCheckError(DataError):
    """A check of a file's column that some rows failed: the message names the file, the column,
    the first failing row (its line for CSV files) and value, and counts the failing rows.

    Carries its parts so that a distributed read, where each piece of a file sees its own rows
    only, can word the same error for the whole file (:mod:`pipeline.preprocess_dist`).

    Args:
        path: the file; column: the column checked; problem: what is wrong, e.g. ``"NaN"``.
        row: the first failing 1-based data row (of the rows checked); count: failing rows.
        value: its value, shown when ``show_value``; rows_checked: rows the check saw.
    """

    def __init__(self, path: Path, column: str, problem: str, row: int, count: int, value: Any = None,
                 show_value: bool = False, rows_checked: int = 0, locate: bool = True) -> None:
        self.path, self.column, self.problem = Path(path), column, problem
        self.row, self.count, self.value, self.show_value = int(row), int(count), _py(value), show_value
        self.rows_checked = int(rows_checked)
        super().__init__(self.message(locate))

    def message(self, locate: bool = True) -> str:
        """``file: column 'c', row r (line l): problem (value v); n such row(s)``; ``locate=False``
        leaves out the line (found by scanning the file)."""
        csv_file = self.path.suffix != ".parquet"
        where = _where(self.path, self.column, self.row, csv_file) if locate else _where(self.path, self.column, None)
        shown = f" (value {self.value!r})" if self.show_value else ""
        return f"{where}: {self.problem}{shown}; {self.count} such row(s)"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its parts (Ray ships exceptions)
        return (RowCheckError, (self.path, self.column, self.problem, self.row, self.count, self.value,
                                self.show_value, self.rows_checked, False))


#: the checks of reading a file, in the order :func:`_read_csv` / :func:`_check_values` make them
#: over one column: while converting it (stage 0), then on its typed values (stage 1); a file's
#: columns are converted one after another, then checked one after another
READ_CHECKS: dict[str, tuple[int, int]] = {
    "not valid UTF-8": (0, 0), "not an integer": (0, 1), "integer out of the int64 range": (0, 2),
    "not a number": (0, 3), "NaN": (1, 0), "infinite value": (1, 1), "empty value": (1, 2),
}


def _raise_at(path: Path, column: str, rows: np.ndarray, bad: np.ndarray, problem: str, values: Any = None) -> None:
    i = _first_bad(bad)
    raise RowCheckError(path, column, problem, int(rows[i]), int(bad.sum()),
                        values[i] if values is not None else None, values is not None, len(rows))


def _convert_strings(arr: pa.ChunkedArray | pa.Array, kind: str, path: Path, column: str) -> pa.Array:
    """Cast a string column to ``kind`` or raise naming the first bad row."""
    arr = pc.utf8_trim_whitespace(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    if kind == "str":
        return arr
    valid = pc.is_valid(arr)
    rows = np.arange(1, len(arr) + 1)
    if kind == "int":
        plain = pc.fill_null(pc.match_substring_regex(arr, _INT_RE), False)
        floaty = pc.fill_null(pc.match_substring_regex(arr, _INT_FLOAT_RE), False)
        bad = np.asarray(pc.and_(valid, pc.invert(pc.or_(plain, floaty))))
        if bad.any():
            _raise_at(path, column, rows, bad, "not an integer", arr.to_pylist())
        arr = pc.replace_substring_regex(arr, r"\.0*$", "")
        arr = pc.replace_substring_regex(arr, r"^\+", "")  # "+5" is 5; Arrow's cast rejects the '+'
        try:
            return pc.cast(arr, pa.int64())
        except pa.ArrowInvalid:
            values = arr.to_pylist()  # an error path: a Python scan is fine
            big = np.array([v is not None and not -(2**63) <= int(v) < 2**63 for v in values])
            if not big.any():
                raise
            _raise_at(path, column, rows, big, "integer out of the int64 range", values)
    ok = pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False)
    bad = np.asarray(pc.and_(valid, pc.invert(ok)))
    if bad.any():
        _raise_at(path, column, rows, bad, "not a number", arr.to_pylist())
    return pc.cast(arr, pa.float64())


def _to_utf8(arr: pa.ChunkedArray | pa.Array, path: Path, column: str) -> pa.Array:
    """Bytes -> string, or a DataError naming the first row that is not valid UTF-8."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    try:
        return pc.cast(arr, pa.string())
    except pa.ArrowInvalid:
        values = arr.to_pylist()  # an error path: a Python scan is fine

        def broken(v: bytes | None) -> bool:
            try:
                v is None or v.decode("utf-8")
            except UnicodeDecodeError:
                return True
            return False

        bad = np.array([broken(v) for v in values])
        if not bad.any():
            raise
        _raise_at(path, column, np.arange(1, len(arr) + 1), bad, "not valid UTF-8", values)
        raise  # unreachable: _raise_at raises


def _check_unique_names(path: Path, names: list[str], where: str) -> None:
    """A name twice in a header: a reader would silently take the first (a stray all-zero
    label column once replaced a whole task's labels)."""
    fields: dict[str, list[int]] = {}
    for i, name in enumerate(names, start=1):
        fields.setdefault(name, []).append(i)
    for name, at in fields.items():
        if len(at) > 1:
            raise DataError(
                f"{path}: column {name!r} appears {len(at)} times in the {where} (fields {', '.join(map(str, at))}); "
                "rename or remove the extra one(s)"
            )


def _csv_header(path: Path) -> list[str]:
    with path.open("rb") as fh:
        first = fh.readline()  # bytes: a bad byte further on must not fail the header
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line 1 (header): not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file (no header line)")
    header = next(csv.reader([text]))
    _check_unique_names(path, header, "header")
    return header


def _locate_parse_error(path: Path, header: list[str], exc: Exception) -> DataError:
    with path.open("r", newline="", encoding="utf-8-sig", errors="replace") as fh:
        row = 0
        for line, fields in enumerate(csv.reader(fh), start=1):
            if line == 1 or not fields:  # the header; empty lines, which the reader skips
                continue
            row += 1
            if len(fields) != len(header):
                return DataError(f"{path}: row {row} (line {line}): {len(fields)} fields, header has {len(header)}")
    return DataError(f"{path}: CSV parse error: {exc}")


def check_source_file(raw: Path, fc: FileConfig) -> Path:
    """The file of ``fc`` exists, is a regular file and is not empty; returns its path."""
    path = raw / fc.path
    if not path.is_file():
        what = "not a regular file" if path.exists() else "file not found"
        raise DataError(f"{path}: {what} (config file entry {fc.path!r})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return path


def read_source(raw: Path, fc: FileConfig) -> pa.Table:
    """Read the configured columns of one file with their types, plus ``_row`` (1-based).

    Raises:
        DataError: missing/empty file, missing column, wrong type, null/NaN in a required
            column, no data rows.
    """
    path = check_source_file(raw, fc)
    try:
        table = _read_parquet(path, fc) if path.suffix == ".parquet" else _read_csv(path, fc)
    except OSError as exc:  # permissions, a truncated file, an I/O error
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    return _check_values(path, fc, table)


def parquet_columns_check(path: Path, fc: FileConfig) -> list[str]:
    """The schema's names, once no name repeats and every configured column is there."""
    schema = pq.read_schema(path)
    _check_unique_names(path, schema.names, "schema")
    missing = [c for c in fc.columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; file has {schema.names}")
    return schema.names


def _read_parquet(path: Path, fc: FileConfig, row_group: int | None = None) -> pa.Table:
    """The configured columns, typed; ``row_group``: only that row group (a distributed read)."""
    parquet_columns_check(path, fc)
    if row_group is None:
        table = pq.read_table(path, columns=list(fc.columns))
    else:
        table = pq.ParquetFile(path).read_row_group(row_group, columns=list(fc.columns))
    cols = {}
    for c, kind in fc.columns.items():
        col = table[c]
        if kind == "str" or not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            text = _to_utf8(col, path, c) if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) else pc.cast(col, pa.string())
            col = _convert_strings(text, kind, path, c)
        cols[c] = col
    return pa.table(cols)


def csv_columns_check(path: Path, fc: FileConfig) -> list[str]:
    """The header's names, once it is readable, no name repeats and every configured column is there."""
    header = _csv_header(path)
    missing = [c for c in fc.columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; header has {header}")
    return header


def _read_csv(path: Path, fc: FileConfig, data: bytes | None = None) -> pa.Table:
    """The configured columns, typed; ``data``: the header plus a row-aligned byte range of the
    file instead of the whole file (a distributed read; rows are then numbered from 1 in it)."""
    wanted = list(fc.columns)
    header = csv_columns_check(path, fc)
    opts = dict(
        read_options=pacsv.ReadOptions(use_threads=data is None, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(newlines_in_values=False),
    )

    def convert(types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(
            include_columns=wanted,
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )

    def source() -> Any:
        return path if data is None else pa.BufferReader(data)

    try:
        table = pacsv.read_csv(source(), convert_options=convert({c: _ARROW_TYPES[k] for c, k in fc.columns.items()}), **opts)
    except pa.ArrowInvalid:
        try:
            # bytes, not strings: a value that is not UTF-8 is then named by column and row
            table = pacsv.read_csv(source(), convert_options=convert({c: pa.binary() for c in wanted}), **opts)
        except pa.ArrowInvalid as exc:
            raise _locate_parse_error(path, header, exc) from None
        cols = {c: _convert_strings(_to_utf8(table[c], path, c), k, path, c) for c, k in fc.columns.items()}
        table = pa.table(cols)
    return table.select(wanted)


def _check_values(path: Path, fc: FileConfig, table: pa.Table) -> pa.Table:
    """Typed columns -> checked columns (no NaN/inf/empty where not allowed) plus ``_row``."""
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    rows = np.arange(1, table.num_rows + 1, dtype=np.int64)
    out = {}
    for c, kind in fc.columns.items():
        col = table[c].combine_chunks()
        if kind == "float":
            col = pc.cast(col, pa.float64())
            nan = np.asarray(pc.fill_null(pc.is_nan(col), False))
            if nan.any():
                if c not in fc.nullable:
                    _raise_at(path, c, rows, nan, "NaN")
                col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
            inf = np.asarray(pc.fill_null(pc.is_inf(col), False))
            if inf.any():
                _raise_at(path, c, rows, inf, "infinite value")
        if c not in fc.nullable and col.null_count:
            _raise_at(path, c, rows, np.asarray(pc.is_null(col)), "empty value")
        out[c] = col
    out["_row"] = pa.array(rows)
    return pa.table(out)


# --------------------------------------------------------------------------------------------
# small helpers


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False)


def hash_uniform(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from (seed, stream, id) (splitmix64), batching-free."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64((seed * 1_000_003 + stream * 7919 + 1) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class _Table:
    """A source table with its config: the main rows, or a side table."""

    fc: FileConfig
    path: Path
    table: pa.Table
    key: str | None = None  # side tables: join key
    train_mask: np.ndarray | None = None  # rows seen by training rows
    encoded: dict[str, pa.Array] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# list and vector parsing


def _parse_list(arr: pa.Array, f: ListConfig, path: Path, rows: np.ndarray, csv_file: bool) -> tuple[pa.Array, pa.Array | None]:
    """``"1;2;3"`` -> list<int64>, or with ``tokens: str`` ``"Comedy|Romance"`` -> list<string>
    (and list<float32> weights for ``"id w;id w"``). An empty entry is an error either way."""
    arr = pc.fill_null(pc.utf8_trim_whitespace(arr), "")
    empty = np.asarray(pc.equal(arr, ""))
    tokens = pc.split_pattern(arr, f.sep)
    tokens = pc.if_else(pa.array(empty), pa.array([[]] * len(arr), type=tokens.type), tokens)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(tokens))
    parent = _np(pc.list_parent_indices(tokens))

    def fail(bad: np.ndarray, problem: str) -> None:
        i = _first_bad(bad)
        r = int(rows[parent[i]])
        raise DataError(
            f"{_where(path, f.column, r, csv_file)}: malformed list entry {flat[i].as_py()!r} ({problem}) "
            f"in {arr[parent[i]].as_py()!r}; {len(np.unique(parent[bad]))} such row(s)"
        )

    if f.weighted:
        pairs = pc.split_pattern(flat, f.pair_sep)
        ok_len = np.asarray(pc.equal(pc.list_value_length(pairs), 2))
        if not ok_len.all():
            fail(~ok_len, f"expected 'id{f.pair_sep}weight'")
        ids_s = pc.list_element(pairs, 0)
        w_s = pc.list_element(pairs, 1)
    else:
        ids_s, w_s = flat, None
    if f.tokens == "str":
        empty_entry = np.asarray(pc.fill_null(pc.equal(ids_s, ""), True))
        if empty_entry.any():
            fail(empty_entry, f"empty entry: two separators {f.sep!r} in a row, or one at an end")
        ids = ids_s
    else:
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(ids_s, _INT_RE), False))
        if not ok.all():
            fail(~ok, "id is not an integer; for string tokens set tokens: str")
        ids = pc.cast(ids_s, pa.int64())
    offsets = tokens.offsets
    id_lists = pa.ListArray.from_arrays(offsets, ids)
    if w_s is None:
        return id_lists, None
    okw = np.asarray(pc.fill_null(pc.match_substring_regex(w_s, _FLOAT_RE), False))
    if not okw.all():
        fail(~okw, "weight is not a number")
    w = _np(pc.cast(w_s, pa.float64()))
    badw = ~np.isfinite(w) | (w < 0)
    if badw.any():
        fail(badw, "weight must be finite and >= 0")
    return id_lists, pa.ListArray.from_arrays(offsets, pa.array(w.astype(np.float32)))


def _parse_vectors(arr: pa.Array, f: VectorConfig, path: Path, rows: np.ndarray, csv_file: bool) -> np.ndarray:
    """``"0.1 0.2 ..."`` -> float32 ``[n, width]``; wrong width / bad float / NaN -> error."""
    arr = pc.utf8_trim_whitespace(arr)
    parts = pc.utf8_split_whitespace(arr) if f.sep == " " else pc.split_pattern(arr, f.sep)
    lengths = _np(pc.fill_null(pc.list_value_length(parts), 0))
    bad = lengths != f.width
    if bad.any():
        i = _first_bad(bad)
        raise DataError(
            f"{_where(path, f.column, int(rows[i]), csv_file)}: vector has {lengths[i]} values, expected {f.width}; "
            f"{int(bad.sum())} such row(s)"
        )
    flat = pc.list_flatten(parts)
    try:
        values = _np(pc.cast(flat, pa.float32()))
    except pa.ArrowInvalid:
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(flat, _FLOAT_RE), False))
        i = _first_bad(~ok)
        r = int(rows[i // f.width])
        raise DataError(
            f"{_where(path, f.column, r, csv_file)}: malformed vector entry {flat[i].as_py()!r} at position {i % f.width}"
        ) from None
    mat = values.reshape(-1, f.width)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        _raise_at(path, f.column, rows, ~finite, "vector has NaN/inf")
    return mat


# --------------------------------------------------------------------------------------------
# the per-block assembly (runs in Ray Data tasks)


@dataclass
class AssemblyContext:
    """Everything a block needs: the side tables, history tables, column layout."""

    sides: list[SideTable]  # joined on their key, held in the block as ``_key__<key>``
    history: list[HistoryGroup]
    column_order: dict[str, list[str]]  # per split name


_CTX_CACHE: dict[str, AssemblyContext] = {}


def _resolve_ctx(ctx: Any) -> AssemblyContext:
    import ray

    if isinstance(ctx, ray.ObjectRef):
        key = ctx.hex()
        if key not in _CTX_CACHE:
            _CTX_CACHE.clear()
            _CTX_CACHE[key] = ray.get(ctx)
        return _CTX_CACHE[key]
    return ctx


def assemble_block(block: pa.Table, ctx: Any) -> pa.Table:
    """Join the encoded side tables, add history windows, order the output columns."""
    ctx = _resolve_ctx(ctx)
    cols: dict[str, pa.Array] = {name: block[name].combine_chunks() for name in block.column_names}
    for side in ctx.sides:
        cols.update(side.transform(cols["_key__" + side.key]))
    if ctx.history:
        days = _np(cols["_day"]).astype(np.int64)
        for g in ctx.history:
            feats = g.features_of_codes(_np(cols[f"_hk_{g.name}"]), days)
            cols[g.name] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    split = SPLITS[int(_np(cols["_split"])[0])] if "_split" in cols else SPLITS[0]
    return pa.table({name: cols[name] for name in ctx.column_order[split]})


def assemble_and_write(block: pa.Table, ctx: Any, out_dir: str) -> pa.Table:
    """:func:`assemble_block`, then write ``out_dir/<split>/part-<k>.parquet``; returns one
    row (split, file, rows) so the driver can check nothing was lost."""
    split = SPLITS[int(_np(block["_split"])[0])]
    part = int(_np(block["_part"])[0])
    table = assemble_block(block, ctx)
    path = Path(out_dir) / split / f"part-{part:05d}.parquet"
    write_part(table, path)
    return pa.table({"split": [split], "file": [path.name], "rows": [table.num_rows]})


def write_part(table: pa.Table, path: Path) -> None:
    """One output Parquet file.

    Args:
        table: assembled rows; path: the file.
    """
    # dictionary encoding only pays for id columns; trying it on float lists costs ~1/3 of the write.
    # min/max statistics of the id columns only (split_files orders files by _row's): those of the
    # float features (history windows, vectors) were a third of the write and nothing reads them
    ids = [f.name for f in table.schema if pa.types.is_integer(f.type)]
    pq.write_table(table, path, use_dictionary=ids, write_statistics=ids)


# --------------------------------------------------------------------------------------------
# the driver


def label_matrix(cfg: DatasetConfig, main_t: pa.Table, main_path: Path, main_rows: np.ndarray,
                 repairs: dict[str, int]) -> np.ndarray:
    """``[n, tasks]`` float32 0/1 labels of main rows (0/1 columns, or ``positive``/``negative``
    values); counts values turned negative (``unlisted: negative``) into ``repairs``.

    Args:
        cfg: the dataset config; main_t: typed main rows; main_path: their file (for errors);
        main_rows: their 1-based data rows; repairs: the report's repair counts (added to).
    """
    labels = np.zeros((main_t.num_rows, len(cfg.labels)), dtype=np.float32)
    for j, lab in enumerate(cfg.labels):
        col = main_t[lab.column].combine_chunks()
        if lab.positive is not None:
            try:
                pos = np.asarray(pc.is_in(col, value_set=pa.array(lab.positive, type=col.type)))
                neg = np.asarray(pc.is_in(col, value_set=pa.array(lab.negative or [], type=col.type)))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
                raise ConfigError(f"label {lab.name}: positive/negative values do not fit column {lab.column!r} "
                                  f"of type {col.type}: {exc}") from None
            other = ~(pos | neg)
            if other.any():
                if lab.unlisted == "error":
                    _raise_at(main_path, lab.column, main_rows, other,
                              f"label value is neither positive {lab.positive} nor negative {lab.negative}", _np(col))
                key = (f"{cfg.main.path}: {lab.column} values neither positive nor negative -> 0 "
                       f"(label {lab.name}, unlisted: negative)")
                repairs[key] = repairs.get(key, 0) + int(other.sum())
            labels[:, j] = pos.astype(np.float32)
        else:
            v = _np(pc.cast(col, pa.float64()))
            bad = ~np.isin(v, [0.0, 1.0])
            if bad.any():
                _raise_at(main_path, lab.column, main_rows, bad, "label must be 0 or 1", _np(col))
            labels[:, j] = v
    return labels


def missing_key_message(key: str, side_path: Path, path: Path, row: int, value: Any, count: int) -> str:
    """``file: column 'key', row r (line l): value v has no row in side_path; n such row(s)``."""
    return (f"{_where(path, key, row, path.suffix != '.parquet')}: value {_py(value)!r} has no row in {side_path}; "
            f"{count} such row(s)")


def _fail_missing_key(key: str, side_path: Path, missing: np.ndarray, values: np.ndarray, sources: list[Path], src: np.ndarray, rows: np.ndarray) -> None:
    i = _first_bad(missing)
    raise DataError(missing_key_message(key, side_path, sources[int(src[i])], int(rows[i]), values[i], int(missing.sum())))


MARKER = "_PREPROCESSED.json"  # this tool's mark on its output: only such a folder is replaced


def _is_preprocess_output(folder: Path) -> bool:
    """Written by this tool: its marker, or (outputs from before the marker) the spec, the
    report and ``_SUCCESS`` together; another tool's ``_SUCCESS`` alone does not count."""
    try:
        return json.loads((folder / MARKER).read_text()).get("tool") == "pipeline.preprocess"
    except (OSError, ValueError, AttributeError):
        return all((folder / name).is_file() for name in ("feature_spec.json", "report.json", SUCCESS))


def check_generated_manifest(raw: Path, cfg: DatasetConfig) -> None:
    """If ``raw`` holds the generator's manifest, the files this config reads must match it
    (size and SHA-256): a folder mixing two generated datasets is an error, not data."""
    path = raw / GENERATED_MANIFEST
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); delete it to use the files as they are") from None
    if isinstance(recorded, dict):  # manifests from before digests list bare names: nothing to check
        fcs = [cfg.main, *cfg.side_tables, *cfg.extra_rows]
        check_digests(raw, GENERATED_MANIFEST, recorded, [fc.path for fc in fcs])


ENGINES = ("distributed", "reference")


def preprocess(cfg: DatasetConfig, raw: str | Path, out: str | Path, ray_num_cpus: int | None = None,
               ray_address: str | None = None, engine: str = "distributed",
               object_store_memory: int | None = None) -> dict[str, Any]:
    """Run the whole stage; returns the report (also written to ``out/report.json``).

    ``out`` is replaced as a whole, and only if this tool wrote it (see :mod:`pipeline.publish`).

    Args:
        cfg: the dataset config; raw: the raw folder; out: the output folder.
        ray_num_cpus, ray_address: see :func:`pipeline.ray_runtime.ensure_ray`.
        engine: ``distributed`` (reads and statistics in Ray tasks, :mod:`pipeline.preprocess_dist`)
            or ``reference`` (:func:`build_reference`, every log-sized array in this process).
        object_store_memory: bytes of a local Ray's object store (spills to disk beyond it).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(f"{raw}: raw data directory not found")
    with publishing(out, "preprocess", _is_preprocess_output, MARKER) as (tmp, stale):
        check_generated_manifest(raw, cfg)
        if engine == "reference":
            report = build_reference(cfg, raw, tmp, ray_num_cpus, ray_address)
        else:
            from pipeline.preprocess_dist import build_distributed

            report = build_distributed(cfg, raw, tmp, ray_num_cpus, ray_address, object_store_memory)
        if stale:
            report["stale_tmp_removed"] = stale
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / MARKER).write_text(json.dumps({"tool": "pipeline.preprocess", "dataset": cfg.name}) + "\n")
        (tmp / SUCCESS).write_text("")
    return report


def ordered_split(times: np.ndarray, valid_fraction: float, test_fraction: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Split codes (0 train, 1 valid, 2 test) of rows by time, and the boundaries.

    The last ``test_fraction`` of the rows by time go to test, the ``valid_fraction`` before
    them to valid. Rows sharing a time are never split apart: the rows at a boundary time all
    go to the side that brings the split's size nearer its fraction (the later side on a tie),
    except that a split asked for rows is not left empty when that time's rows can fill it.

    Example:
        >>> codes, bounds = ordered_split(np.array([5, 1, 2, 2, 3, 4, 4, 4, 6, 7]), 0.2, 0.2)
        >>> codes.tolist()  # valid: time 5 only (1 row; with the three 4s it would be 4 rows)
        [1, 0, 0, 0, 0, 0, 0, 0, 2, 2]
        >>> bounds["valid_from"], bounds["test_from"]
        (5, 6)
    """
    uniq, inverse, counts = np.unique(times, return_inverse=True, return_counts=True)
    time_codes, boundaries = ordered_split_counts(uniq, counts, valid_fraction, test_fraction)
    return time_codes[inverse.reshape(-1)].astype(np.int8), boundaries


def ordered_split_counts(times: np.ndarray, counts: np.ndarray, valid_fraction: float,
                         test_fraction: float) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`ordered_split` from the distinct times (sorted) and their row counts: the split
    code of each distinct time (rows sharing a time are never split apart) and the boundaries.

    Args:
        times: sorted distinct times; counts: rows per time; fractions as in :func:`ordered_split`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)  # rows up to and including each time
    n = int(ends[-1]) if len(ends) else 0

    def time_at(position: int) -> int:
        return int(np.searchsorted(ends, position, side="right"))

    def start(rows_before: int, wanted: int) -> int:
        """The sorted position where the last ``wanted`` of the first ``rows_before`` rows begin,
        moved to a change of time (whichever is nearer; ties: earlier position = larger split)."""
        cut = max(rows_before - wanted, 0)
        if wanted == 0 or cut >= rows_before:
            return rows_before
        i = time_at(cut)
        lo = int(ends[i] - counts[i])  # the time's rows go later
        hi = min(int(ends[i]), rows_before)  # ...or earlier
        if hi == rows_before:  # the nearer choice would leave the asked-for split empty
            return lo
        return lo if cut - lo <= hi - cut else hi

    test_at = start(n, int(round(test_fraction * n)))
    valid_at = start(test_at, int(round(valid_fraction * n)))
    firsts = ends - counts  # sorted position of each time's first row; cuts fall on them
    codes = np.where(firsts >= test_at, 2, np.where(firsts >= valid_at, 1, 0)).astype(np.int8)
    boundaries: dict[str, Any] = {}
    for name, at in (("valid_from", valid_at), ("test_from", test_at)):
        boundaries[name] = _py(times[time_at(at)]) if at < n else None
    boundaries["fractions"] = {s: round(float(counts[codes == k].sum() / n), 6) if n else 0.0 for k, s in enumerate(SPLITS)}
    return codes, boundaries


def history_rows(protocol: str, is_labelled: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Rows whose labels feed history features: ``online`` every labelled row; ``train_only``
    the labelled rows outside the valid and test splits (training rows, history-only rows)."""
    if protocol == "online":
        return is_labelled
    return is_labelled & (split != 1) & (split != 2)


def _check_splits(cfg: DatasetConfig, main_path: Path, split: np.ndarray, labels: np.ndarray,
                  is_labelled: np.ndarray) -> list[str]:
    """:func:`check_split_counts` of row arrays."""
    rows = {code: int((split == code).sum()) for code in range(len(SPLITS))}
    labelled = {code: int(((split == code) & is_labelled).sum()) for code in range(len(SPLITS))}
    positives = {code: [int((labels[(split == code) & is_labelled, j] == 1).sum()) for j in range(len(cfg.labels))]
                 for code in range(len(SPLITS))}
    return check_split_counts(cfg, main_path, rows, labelled, positives)


def check_split_counts(cfg: DatasetConfig, main_path: Path, rows: dict[int, int], labelled: dict[int, int],
                       positives: dict[int, list[int]]) -> list[str]:
    """A configured valid/test split with no rows, or a task with no positive in training, is
    an error; a task with no positive in validation is a warning (printed, and returned for the
    report): its validation AUC is undefined, yet small samples of rare actions have none.

    Args:
        cfg: the config; main_path: the main file (named in messages); rows: rows per split code;
        labelled: labelled rows per split code; positives: per split code, positives per task.
    """
    sp = cfg.split
    wanted = {1: sp.valid_days if sp.kind == "day" else sp.valid_fraction,
              2: sp.test_days if sp.kind == "day" else sp.test_fraction}
    for code, rule in wanted.items():
        if rule and not rows.get(code, 0):
            raise DataError(f"{main_path}: the {SPLITS[code]} split is empty: no row falls in it "
                            f"(split {sp.model_dump(exclude_defaults=True)})")
    warnings_: list[str] = []
    for j, lab in enumerate(cfg.labels):
        for code in (0, 1):
            if labelled.get(code, 0) and not positives[code][j]:
                msg = (f"{main_path}: column {lab.column!r}: label {lab.name!r} has no positive in the "
                       f"{SPLITS[code]} split ({labelled[code]} rows)")
                if code == 0:
                    raise DataError(msg + "; the task has nothing to learn")
                warnings_.append(msg + "; its validation metrics are undefined")
    for msg in warnings_:
        print(f"preprocess: warning: {msg}", file=sys.stderr)
    return warnings_


@dataclass
class _RefRows:
    """The reference builder's rows (main, then extra) and what later phases add to them.

    Args:
        rows_t: the needed main columns plus ``_row`` and ``_source`` of every row.
        labels: ``[n, tasks]`` float32 labels (NaN: unlabelled); is_labelled: main rows.
        sources: the file of each ``_source`` code.
    """

    rows_t: pa.Table
    labels: np.ndarray
    is_labelled: np.ndarray
    sources: list[Path]
    sides: list[_Table] = field(default_factory=list)
    side_pos: list[np.ndarray] = field(default_factory=list)  # per side table, the side row of each row (-1: none)
    days: np.ndarray | None = None
    split: np.ndarray | None = None  # 0 train, 1 valid, 2 test, -1 outside every split

    @property
    def src(self) -> np.ndarray:
        return _np(self.rows_t["_source"])

    @property
    def row_no(self) -> np.ndarray:
        return _np(self.rows_t["_row"])

    @property
    def train(self) -> np.ndarray:
        return self.split == 0

    def locate(self, cfg: DatasetConfig, column: str) -> tuple[int | None, str]:
        """The side table a column comes from (None: the main rows), and its file."""
        for i, s in enumerate(self.sides):
            if column in s.fc.columns and column != s.key:
                return i, s.fc.path
        return None, cfg.main.path

    def joined(self, cfg: DatasetConfig, column: str) -> np.ndarray:
        """Per-row values of a column (main or side), with None for missing side rows."""
        i, _ = self.locate(cfg, column)
        if i is None:
            return _np(self.rows_t[column])
        vals = self.sides[i].table[column].combine_chunks()
        return _np(vals.take(pa.array(self.side_pos[i], mask=self.side_pos[i] < 0)))


@dataclass
class _RefFit:
    """What the reference builder's fit phases produce: encoded row and side columns, the
    fitted objects, spec entries and the report's entries."""

    row_cols: dict[str, pa.Array]
    side_enc: list[dict[str, pa.Array]]
    oov_fill: dict[str, int] = field(default_factory=dict)
    main_sparse: dict[str, tuple[str, Vocabulary]] = field(default_factory=dict)  # what a RowTransformer holds
    main_dense: dict[str, tuple[str, DenseScaler]] = field(default_factory=dict)
    main_unsupported: list[str] = field(default_factory=list)
    spec_sparse: list[SparseFeature] = field(default_factory=list)
    spec_lists: list[ListFeature] = field(default_factory=list)
    spec_dense: list[DenseFeature] = field(default_factory=list)
    spec_vectors: list[VectorFeature] = field(default_factory=list)
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    oov: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_oov: dict[str, dict[str, int]] = field(default_factory=dict)
    list_info: dict[str, Any] = field(default_factory=dict)
    pca_info: dict[str, Any] = field(default_factory=dict)
    dense_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    groups: list[HistoryGroup] = field(default_factory=list)
    hist_names: dict[str, list[str]] = field(default_factory=dict)

    def per_split(self, split: np.ndarray, per_row: np.ndarray) -> dict[str, int]:
        return {s: int(per_row[split == k].sum()) for k, s in enumerate(SPLITS)}


def build_reference(cfg: DatasetConfig, raw: Path, tmp: Path, ray_num_cpus: int | None = None,
                    ray_address: str | None = None) -> dict[str, Any]:
    """The single-process builder (every log-sized array in the driver), kept as the reference
    the distributed builder (:mod:`pipeline.preprocess_dist`) is tested against and as the one
    that words the error when that builder finds bad input; also used for main-row list/vector
    features, which the distributed builder does not take.

    Phases: read the rows (:func:`_ref_read_rows`), join the side tables (:func:`_ref_join_sides`),
    split (:func:`_ref_split`), fit encoders (:func:`_ref_fit_encoders`), history tables
    (:func:`_ref_history`), meta columns and sampling (:func:`_ref_meta`), assemble and write
    in Ray Data (:func:`_ref_assemble_write`), spec and report (:func:`_ref_finish`).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"dataset": cfg.name, "raw": str(raw.resolve()), "attribution": cfg.attribution}
    repairs: dict[str, int] = {}
    rows = _ref_read_rows(cfg, raw, report, repairs)
    timings["read_main"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    _ref_join_sides(cfg, raw, rows, report, repairs)
    timings["read_side"] = time.perf_counter() - t0
    _ref_split(cfg, raw, rows, report)
    t0 = time.perf_counter()
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    fit = _ref_fit_encoders(cfg, raw, rows, artifacts, repairs)
    timings["fit_encoders"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ref_history(cfg, rows, fit, report)
    timings["history_aggregates"] = time.perf_counter() - t0
    keep, mask_names = _ref_meta(cfg, rows, fit, report)
    split_rows = _ref_assemble_write(cfg, rows, fit, keep, mask_names, tmp, ray_num_cpus, ray_address, report, timings)
    report["repairs"] = repairs
    return _ref_finish(cfg, rows, fit, keep, split_rows, tmp, report, timings, t_start)


def _ref_read_rows(cfg: DatasetConfig, raw: Path, report: dict[str, Any], repairs: dict[str, int]) -> _RefRows:
    """Main rows (read, labels, de-duplicated), then the extra unlabelled rows; the report's
    ``inputs`` and ``dedup``."""
    main_t = read_source(raw, cfg.main)
    main_path = raw / cfg.main.path
    report["inputs"] = {cfg.main.path: main_t.num_rows}
    labels = label_matrix(cfg, main_t, main_path, _np(main_t["_row"]), repairs)
    dup_info: dict[str, Any] = {"duplicates": 0}
    if cfg.dedup is not None:
        keys_df = pd.DataFrame({k: _np(main_t[k]) for k in cfg.dedup.keys})
        dup = keys_df.duplicated(keep="first" if cfg.dedup.keep == "first" else "last").to_numpy()
        keep_idx = np.flatnonzero(~dup)
        n_dup = int(dup.sum())
        dup_info = {"keys": cfg.dedup.keys, "keep": cfg.dedup.keep, "duplicates": int(n_dup), "dropped": 0}
        if cfg.dedup.keep != "all" and n_dup:
            main_t = main_t.take(pa.array(keep_idx))
            labels = labels[keep_idx]
            dup_info["dropped"] = int(n_dup)
    report["dedup"] = dup_info

    sources = [main_path]
    needed = [c for c in cfg.main.columns if c not in {lab.column for lab in cfg.labels}]
    parts = [main_t.select([*needed, "_row"]).append_column("_source", pa.array(np.zeros(main_t.num_rows, np.int8)))]
    labelled = [np.ones(main_t.num_rows, dtype=bool)]
    for i, ex in enumerate(cfg.extra_rows, start=1):
        t = read_source(raw, ex)
        report["inputs"][ex.path] = t.num_rows
        sources.append(raw / ex.path)
        cols = {}
        for c in needed:
            if c in t.column_names:
                cols[c] = pc.cast(t[c], parts[0].schema.field(c).type)
            elif c in ex.assign:
                cols[c] = pa.array([ex.assign[c]] * t.num_rows, type=parts[0].schema.field(c).type)
            else:
                raise DataError(f"{raw / ex.path}: missing column {c!r} (needed like in {cfg.main.path}; or set assign)")
        cols["_row"] = t["_row"]
        cols["_source"] = pa.array(np.full(t.num_rows, i, np.int8))
        parts.append(pa.table(cols))
        labelled.append(np.zeros(t.num_rows, dtype=bool))
    is_labelled = np.concatenate(labelled)
    labels = np.concatenate([labels, np.full(((~is_labelled).sum(), len(cfg.labels)), np.nan, np.float32)])
    return _RefRows(pa.concat_tables(parts).combine_chunks(), labels, is_labelled, sources)


def _ref_join_sides(cfg: DatasetConfig, raw: Path, rows: _RefRows, report: dict[str, Any], repairs: dict[str, int]) -> None:
    """Read each side table (a repeated key is an error) and find each row's side row (a
    missing one is an error unless ``on_missing: null``, then a counted repair)."""
    src, row_no = rows.src, rows.row_no
    for sc in cfg.side_tables:
        st = read_source(raw, sc)
        report["inputs"][sc.path] = st.num_rows
        spath = raw / sc.path
        keyv = _np(st[sc.key])
        order = np.argsort(keyv, kind="stable")
        dup = keyv[order][1:] == keyv[order][:-1]
        if dup.any():
            i = int(order[1:][dup][0])
            raise DataError(f"{_where(spath, sc.key, i + 1, spath.suffix != '.parquet')}: duplicate key {_py(keyv[i])!r}; {int(dup.sum())} duplicate(s)")
        pos = pc.index_in(rows.rows_t[sc.key], value_set=st[sc.key].combine_chunks())
        pos_np = _np(pc.fill_null(pos, -1)).astype(np.int64)
        missing = pos_np < 0
        if missing.any():
            if sc.on_missing == "error":
                _fail_missing_key(sc.key, spath, missing, _np(rows.rows_t[sc.key]), rows.sources, src, row_no)
            repairs[f"{sc.path}: rows without a {sc.key} match (side features missing -> OOV/0/empty)"] = int(missing.sum())
        rows.sides.append(_Table(sc, spath, st, key=sc.key))
        rows.side_pos.append(pos_np)


def _ref_split(cfg: DatasetConfig, raw: Path, rows: _RefRows, report: dict[str, Any]) -> None:
    """Days and split codes of the rows, the split checks, each side table's training mask."""
    sp, main_path = cfg.split, raw / cfg.main.path
    src, row_no, is_labelled = rows.src, rows.row_no, rows.is_labelled
    split = np.full(rows.rows_t.num_rows, -1, dtype=np.int8)
    days = None
    if cfg.time is not None:
        days = rows.joined(cfg, cfg.time).astype(np.int64)
        if days.min() < 0:
            i = _first_bad(days < 0)
            raise DataError(f"{_where(rows.sources[src[i]], cfg.time, int(row_no[i]))}: negative time {_py(days[i])} "
                            f"(time_unit {cfg.time_unit}: times must be >= 0)")
    if sp.kind == "day":
        for code, rng in enumerate((sp.train_days, sp.valid_days, sp.test_days)):
            if rng is not None:
                split[(days >= rng[0]) & (days <= rng[1]) & (split < 0)] = code
    elif sp.kind == "ordered":
        split[:] = 2  # unlabelled (extra) rows: test, as under random
        split[is_labelled], report["split_boundaries"] = ordered_split(days[is_labelled], sp.valid_fraction, sp.test_fraction)
    else:
        u = hash_uniform(sp.seed, 0, src.astype(np.int64) * (1 << 40) + row_no)
        split[:] = 0
        split[u < sp.valid_fraction + sp.test_fraction] = 1
        split[u < sp.test_fraction] = 2
        split[~is_labelled] = 2
    bad = (~is_labelled) & (split == 0)
    if bad.any():
        i = _first_bad(bad)
        raise DataError(f"{_where(rows.sources[src[i]], cfg.time, int(row_no[i]))}: unlabelled row falls in the training split")
    rows.days, rows.split = days, split
    train = rows.train
    if not train.any():
        raise DataError(f"{main_path}: no training rows under split {sp.model_dump()}")
    report["warnings"] = _check_splits(cfg, main_path, split, rows.labels, is_labelled)
    report["rows_outside_splits"] = int((split < 0).sum())
    for s_i, s in enumerate(rows.sides):
        p = rows.side_pos[s_i][train]
        mask = np.zeros(s.table.num_rows, dtype=bool)
        mask[p[p >= 0]] = True
        s.train_mask = mask


def _ref_fit_encoders(cfg: DatasetConfig, raw: Path, rows: _RefRows, artifacts: Path, repairs: dict[str, int]) -> _RefFit:
    """Vocabularies, scalers, list encoders and PCA fitted on the training rows; the encoded
    row and side columns; their artifacts."""
    fit = _RefFit({"_row": rows.rows_t["_row"].combine_chunks(), "_source": rows.rows_t["_source"].combine_chunks()},
                  [dict() for _ in rows.sides])
    _ref_fit_sparse(cfg, rows, fit, artifacts)
    _ref_fit_dense(cfg, raw, rows, fit, repairs)
    _ref_fit_lists(cfg, raw, rows, fit, artifacts)
    _ref_fit_vectors(cfg, raw, rows, fit, artifacts)
    return fit


def _ref_fit_sparse(cfg: DatasetConfig, rows: _RefRows, fit: _RefFit, artifacts: Path) -> None:
    """Sparse features: a vocabulary of the training rows' values, OOV and missing counts."""
    split, train = rows.split, rows.train
    for f in cfg.sparse:
        si, _ = rows.locate(cfg, f.column)
        if si is None:
            values = rows.rows_t[f.column].combine_chunks()
            vocab = Vocabulary().fit(values.filter(pa.array(train)))
            enc = vocab.transform(values)
            fit.row_cols[f.name] = pa.array(enc)
            fit.main_sparse[f.name] = (f.column, vocab)
            row_null = np.asarray(pc.is_null(values))
            fit.oov[f.name] = fit.per_split(split, ~row_null & (enc == vocab.size))
        else:
            s = rows.sides[si]
            values = s.table[f.column].combine_chunks()
            vocab = Vocabulary().fit(values.filter(pa.array(s.train_mask)))
            enc = vocab.transform(values)
            fit.side_enc[si][f.name] = pa.array(enc)
            fit.oov_fill[f.name] = vocab.size
            p = rows.side_pos[si]
            null_side = np.asarray(pc.is_null(values))
            row_null = (p < 0) | null_side[np.maximum(p, 0)]
            fit.oov[f.name] = fit.per_split(split, ~row_null & (enc[np.maximum(p, 0)] == vocab.size))
        if row_null.any():
            fit.missing_oov[f.name] = fit.per_split(split, row_null)
        if vocab.size == 0:
            raise DataError(f"sparse feature {f.name!r} (column {f.column!r}): no values in training rows")
        fit.vocab_sizes[f.name] = vocab.size
        vocab.save(artifacts / f"vocab_{f.name}.parquet")
        fit.spec_sparse.append(SparseFeature(f.name, vocab_size=vocab.size, embedding_dim=f.embedding_dim))


def _ref_fit_dense(cfg: DatasetConfig, raw: Path, rows: _RefRows, fit: _RefFit, repairs: dict[str, int]) -> None:
    """Dense features: empty -> 0 (a counted repair), scalers fitted per training row."""
    train = rows.train
    for f in cfg.dense:
        si, fpath = rows.locate(cfg, f.column)
        tbl = rows.rows_t if si is None else rows.sides[si].table
        col = tbl[f.column].combine_chunks()
        v = _np(pc.cast(col, pa.float64())).astype(np.float64)
        nulls = np.isnan(v)
        if nulls.any():
            repairs[f"{fpath}: {f.column} empty -> 0 (before scaling)"] = int(nulls.sum())
            v = np.where(nulls, 0.0, v)
        scaler = DenseScaler(f.transform)
        neg = scaler.invalid(v)
        if neg.any():
            rws = rows.row_no if si is None else _np(tbl["_row"])
            _raise_at(raw / fpath, f.column, rws, neg, "log1p needs values >= 0", v)
        # side columns: fitted per training impression (a side row counts once per row joined to it)
        scaler.fit(v[train] if si is None else v[rows.side_pos[si][train & (rows.side_pos[si] >= 0)]])
        fit.dense_stats[f.name] = scaler.to_dict()
        arr = pa.array(scaler.transform(v))
        if si is None:
            fit.row_cols[f.name] = arr
            fit.main_dense[f.name] = (f.column, scaler)
        else:
            fit.side_enc[si][f.name] = arr
        fit.spec_dense.append(DenseFeature(f.name))


def _ref_fit_lists(cfg: DatasetConfig, raw: Path, rows: _RefRows, fit: _RefFit, artifacts: Path) -> None:
    """List features: parsed, a vocabulary of the training rows' ids, OOV entries and truncations."""
    for f in cfg.lists:
        si, fpath = rows.locate(cfg, f.column)
        tbl = rows.rows_t if si is None else rows.sides[si].table
        tmask = rows.train if si is None else rows.sides[si].train_mask
        ids, weights = _parse_list(tbl[f.column].combine_chunks(), f, raw / fpath, _np(tbl["_row"]), not fpath.endswith(".parquet"))
        lengths = _np(pc.list_value_length(ids))
        trunc = lengths > f.max_len
        encoder = ListEncoder(f.max_len).fit(ids.filter(pa.array(tmask)))
        if encoder.size == 0:
            raise DataError(f"list feature {f.name!r} (column {f.column!r}): no ids in training rows")
        enc, weights = encoder.transform(ids, weights)
        enc_flat = _np(pc.list_flatten(enc))
        parents = _np(pc.list_parent_indices(enc)) if len(enc_flat) else np.zeros(0, np.int64)
        oov_entries = np.bincount(parents, weights=(enc_flat == encoder.size), minlength=len(ids)).astype(np.int64)
        pos = rows.side_pos[si] if si is not None else None
        per_row_lists_oov = oov_entries if pos is None else np.where(pos >= 0, oov_entries[np.maximum(pos, 0)], 0)
        fit.oov[f.name] = fit.per_split(rows.split, per_row_lists_oov)
        fit.list_info[f.name] = {"empty_lists": int((lengths == 0).sum()), "truncated": int(trunc.sum()), "max_len": f.max_len, "table_rows": len(lengths)}
        fit.vocab_sizes[f.name] = encoder.size
        encoder.save(artifacts / f"vocab_{f.name}.parquet")
        if si is None:
            fit.main_unsupported.append(f.name)
        target = fit.row_cols if si is None else fit.side_enc[si]
        target[f.name] = enc
        if f.weighted:
            target[f.name + WEIGHT_SUFFIX] = weights
        fit.spec_lists.append(ListFeature(f.name, vocab_size=encoder.size, max_len=f.max_len, embedding_dim=f.embedding_dim, pooling=f.pooling, weighted=f.weighted))


def _ref_fit_vectors(cfg: DatasetConfig, raw: Path, rows: _RefRows, fit: _RefFit, artifacts: Path) -> None:
    """Vector features: parsed, PCA fitted on the training rows' (distinct side) rows."""
    for f in cfg.vectors:
        si, fpath = rows.locate(cfg, f.column)
        tbl = rows.rows_t if si is None else rows.sides[si].table
        tmask = rows.train if si is None else rows.sides[si].train_mask
        mat = _parse_vectors(tbl[f.column].combine_chunks(), f, raw / fpath, _np(tbl["_row"]), not fpath.endswith(".parquet"))
        if si is None:
            fit.main_unsupported.append(f.name)
        if f.pca_dim is not None:
            pca = PCA(f.pca_dim).fit(mat[tmask])
            mat = pca.transform(mat)
            pca.save(artifacts / f"pca_{f.name}.npz")
            fit.pca_info[f.name] = {"fit_rows": int(tmask.sum()), "dim": f.pca_dim,
                                    "explained_variance": float(pca.explained_variance_ratio.sum())}
        dim = mat.shape[1]
        arr = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1).astype(np.float32)), dim)
        (fit.row_cols if si is None else fit.side_enc[si])[f.name] = arr
        fit.spec_vectors.append(VectorFeature(f.name, dim=dim))


def _ref_history(cfg: DatasetConfig, rows: _RefRows, fit: _RefFit, report: dict[str, Any]) -> None:
    """History tables of each key group from the rows the protocol allows; each row's key code."""
    report["history"] = None
    if cfg.history is None:
        return
    lab_names = [lab.name for lab in cfg.labels]
    split, days = rows.split, rows.days
    src, row_no = rows.src, rows.row_no
    actions_idx = [lab_names.index(a) for a in cfg.history_actions]
    day_base = int(days.max()) + 2
    hist_rows = history_rows(cfg.history.protocol, rows.is_labelled, split)
    report["history"] = {
        "protocol": cfg.history.protocol, "time_unit": cfg.time_unit, "windows": cfg.history.windows,
        "rows_fed": int(hist_rows.sum()),
        "rows_fed_by_split": {name: int((hist_rows & (split == code)).sum()) for code, name in enumerate(SPLITS)}
                             | {"outside_splits": int((hist_rows & (split < 0)).sum())},
    }
    for keys in cfg.history.keys:
        name = "hist_" + "_".join(keys)
        vals = [rows.joined(cfg, k) for k in keys]
        for k, v in zip(keys, vals):
            miss = np.asarray(pd.isna(v)) & hist_rows
            if miss.any():
                i = _first_bad(miss)
                raise DataError(
                    f"{_where(rows.sources[src[i]], k, int(row_no[i]))}: history key {k!r} is missing "
                    f"(side table on_missing=null); {int(miss.sum())} such labelled row(s)"
                )
        g = HistoryGroup.fit(name, keys, [v[hist_rows] for v in vals], days[hist_rows],
                             rows.labels[hist_rows][:, actions_idx], day_base, cfg.history.windows, cfg.history.stats)
        fit.groups.append(g)
        fit.row_cols[f"_hk_{name}"] = pa.array(g.row_codes(vals))
        fit.hist_names[name] = history_feature_names(name, cfg.history.windows, cfg.history_actions, cfg.history.stats,
                                                     TIME_UNIT_SUFFIX[cfg.time_unit])
        fit.spec_dense.append(DenseFeature(name, dim=len(fit.hist_names[name])))


def _ref_meta(cfg: DatasetConfig, rows: _RefRows, fit: _RefFit, report: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Meta and label columns; negative sampling: the rows kept and the mask columns' names."""
    lab_names = [lab.name for lab in cfg.labels]
    n_rows, labels, train = rows.rows_t.num_rows, rows.labels, rows.train
    if cfg.user is not None:
        fit.row_cols["_user"] = pa.array(rows.joined(cfg, cfg.user))
    if cfg.item is not None:
        fit.row_cols["_item"] = pa.array(rows.joined(cfg, cfg.item))
    if rows.days is not None:
        fit.row_cols["_day"] = pa.array(rows.days)
    for j, name in enumerate(lab_names):
        fit.row_cols[name] = pa.array(labels[:, j])
    keep = np.ones(n_rows, dtype=bool)
    sampling: dict[str, Any] | None = None
    mask_names: list[str] = []
    if cfg.negative_sampling is not None:
        ns = cfg.negative_sampling
        kept_any = np.zeros(n_rows, dtype=bool)
        sampling = {"seed": ns.seed, "rates": ns.rates, "per_action": {}}
        gid = rows.src.astype(np.int64) * (1 << 40) + rows.row_no
        for j, name in enumerate(lab_names):
            rate = ns.rates.get(name, 1.0)
            keep_a = (labels[:, j] == 1) | (hash_uniform(ns.seed, 1 + j, gid) < rate)
            kept_any |= keep_a
            fit.row_cols[MASK_PREFIX + name] = pa.array(keep_a.astype(np.float32))
            mask_names.append(MASK_PREFIX + name)
            neg_train = train & (labels[:, j] == 0)
            sampling["per_action"][name] = {"rate": rate, "train_negatives": int(neg_train.sum()), "kept_negatives": int((neg_train & keep_a).sum())}
        keep = np.where(train, kept_any, True)
        sampling["train_rows_before"] = int(train.sum())
        sampling["train_rows_after"] = int((train & keep).sum())
    report["negative_sampling"] = sampling
    return keep, mask_names


def _ref_feature_cols(fit: _RefFit) -> list[str]:
    """The feature columns in output order."""
    feature_cols = [f.name for f in fit.spec_sparse]
    for f in fit.spec_lists:
        feature_cols.append(f.name)
        if f.weighted:
            feature_cols.append(f.name + WEIGHT_SUFFIX)
    return feature_cols + [f.name for f in fit.spec_dense] + [f.name for f in fit.spec_vectors]


def _ref_assemble_write(cfg: DatasetConfig, rows: _RefRows, fit: _RefFit, keep: np.ndarray, mask_names: list[str],
                        tmp: Path, ray_num_cpus: int | None, ray_address: str | None, report: dict[str, Any],
                        timings: dict[str, float]) -> dict[str, int]:
    """Ray Data: join the side tables, history windows, write each split; save the row
    transformer; returns the rows written per split."""
    t0 = time.perf_counter()
    import ray

    ensure_ray(num_cpus=ray_num_cpus, address=ray_address)
    # which Ray ran the job: a local run must not have joined a head running on the machine
    report["ray"] = {"gcs_address": ray.get_runtime_context().gcs_address}
    timings["ray_init"] = time.perf_counter() - t0
    lab_names = [lab.name for lab in cfg.labels]
    split, is_labelled, row_cols = rows.split, rows.is_labelled, fit.row_cols
    meta = [c for c in ("_row", "_user", "_item", "_day") if c in row_cols]
    feature_cols = _ref_feature_cols(fit)
    side_keys = []
    side_tables: list[SideTable] = []
    hist_keys = {k for keys in (cfg.history.keys if cfg.history else []) for k in keys}
    for si, s in enumerate(rows.sides):
        raw_keep = {k: s.table[k].combine_chunks() for k in sorted(hist_keys) if rows.locate(cfg, k)[0] == si}
        if fit.side_enc[si] or raw_keep:
            fill = {name: v for name, v in fit.oov_fill.items() if name in fit.side_enc[si]}
            side_tables.append(SideTable.fit(s.key, s.table[s.key].combine_chunks(), fit.side_enc[si], fill, raw_keep))
            # raw join key under a reserved name: a feature may share the key's name (feedid)
            side_keys.append("_key__" + s.key)
            row_cols["_key__" + s.key] = rows.rows_t[s.key].combine_chunks()
    hk_cols = [f"_hk_{g.name}" for g in fit.groups]
    input_cols = list(dict.fromkeys([*meta, *[c for c in feature_cols if c in row_cols], *side_keys, *hk_cols, *lab_names, *mask_names]))
    if "_day" not in input_cols and fit.groups:
        input_cols.append("_day")
    input_table = pa.table({c: row_cols[c] for c in input_cols})
    split_rows: dict[str, int] = {}
    orders: dict[str, list[str]] = {}
    blocks: list[pa.Table] = []
    for code, sname in enumerate(SPLITS):
        sel = (split == code) & keep
        labelled_split = bool(is_labelled[sel].all()) if sel.any() else True
        if sel.any() and not labelled_split and is_labelled[sel].any():
            raise DataError(f"split {sname} mixes labelled and unlabelled rows; check split ranges")
        orders[sname] = [*meta, *feature_cols]
        if labelled_split:
            orders[sname] += lab_names + (mask_names if sname == "train" else [])
        split_rows[sname] = int(sel.sum())
        (tmp / sname).mkdir()
        part = input_table.filter(pa.array(sel))
        for k, start in enumerate(range(0, part.num_rows, cfg.rows_per_block)):
            b = part.slice(start, cfg.rows_per_block)
            b = b.append_column("_split", pa.array(np.full(b.num_rows, code, np.int8)))
            blocks.append(b.append_column("_part", pa.array(np.full(b.num_rows, k, np.int32))))
    ctx = AssemblyContext(side_tables, fit.groups, orders)
    main_inputs = [c for c in cfg.main.columns if c not in {lab.column for lab in cfg.labels}]
    transformer = RowTransformer(
        {c: cfg.main.columns[c] for c in main_inputs if not (cfg.time and c == cfg.time)},
        fit.main_sparse, fit.main_dense, side_tables, fit.groups, feature_cols, time=cfg.time,
        serve_day=int(rows.days[is_labelled].max()) + 1 if rows.days is not None else None,
        user=cfg.user, item=cfg.item, unsupported=fit.main_unsupported,
    )
    transformer.save(tmp / "artifacts")
    files: list[dict[str, Any]] = []
    if blocks:
        ctx_ref = ray.put(ctx)
        # one Ray Data job: every block is assembled and written by one task (2 in parallel on
        # 2 CPUs); the tasks return one small row per file written
        ds = ray.data.from_arrow(blocks).map_batches(
            assemble_and_write, batch_format="pyarrow", batch_size=None, num_cpus=1,
            fn_kwargs={"ctx": ctx_ref, "out_dir": str(tmp)},
        )
        files = ds.take_all()
        del ctx_ref
    timings["ray_assemble_write"] = time.perf_counter() - t0

    written = {s: sum(pq.read_metadata(p).num_rows for p in (tmp / s).glob("*.parquet")) for s in SPLITS}
    if sum(int(f["rows"]) for f in files) != sum(split_rows.values()):
        raise RuntimeError(f"Ray tasks wrote {sum(int(f['rows']) for f in files)} rows, expected {split_rows}")
    if written != split_rows:
        raise RuntimeError(f"rows written {written} != rows selected {split_rows}")
    return split_rows


def _ref_finish(cfg: DatasetConfig, rows: _RefRows, fit: _RefFit, keep: np.ndarray, split_rows: dict[str, int],
                tmp: Path, report: dict[str, Any], timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """``feature_spec.json`` (numeric bin edges of the written training rows), the dense
    stats, ``report.json`` and the config; returns the report."""
    lab_names = [lab.name for lab in cfg.labels]
    split, is_labelled, labels = rows.split, rows.is_labelled, rows.labels
    artifacts = tmp / "artifacts"
    spec = FeatureSpec(sparse=fit.spec_sparse, lists=fit.spec_lists, dense=fit.spec_dense, vectors=fit.spec_vectors,
                       tasks=lab_names, user_column="_user" if cfg.user else None)
    t0 = time.perf_counter()
    if cfg.numeric_bins is not None:  # issue 14: quantile edges of the written training rows
        spec = fit_numeric_boundaries(spec, tmp / "train", cfg.numeric_bins, artifacts)
    spec.save(tmp / "feature_spec.json")
    timings["numeric_bins"] = time.perf_counter() - t0
    (artifacts / "dense_stats.json").write_text(json.dumps(fit.dense_stats, indent=2))
    report.update(
        {
            "rows": {"main_after_dedup": int(is_labelled.sum()), "extra": int((~is_labelled).sum())},
            "splits": split_rows,
            "split_rule": cfg.split.model_dump(),
            "labelled_splits": [s for s in SPLITS if (tmp / s).exists() and split_rows[s] and bool(is_labelled[(split == SPLITS.index(s))].all())],
            "label_rates": {s: {n: float(np.nanmean(labels[(split == k) & keep & is_labelled, j])) for j, n in enumerate(lab_names)} for k, s in enumerate(SPLITS) if ((split == k) & is_labelled).any()},
            "vocab_sizes": fit.vocab_sizes,
            "oov": fit.oov,
            "missing_to_oov": fit.missing_oov,
            "repairs": report["repairs"],
            "lists": fit.list_info,
            "pca": fit.pca_info,
            "history_columns": fit.hist_names,
            "timings_s": {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()},
            "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        }
    )
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (tmp / "dataset_config.yaml").write_text(dump_config(cfg))
    return report


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", required=True, help="directory with the raw files (e.g. wechat_algo_data1/)")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="dataset config YAML (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (e.g. 'auto', '127.0.0.1:6379'); default: RAY_ADDRESS "
                             "if set (as under 'ray job submit'), else a private local Ray, even when a "
                             "head runs on this machine")
    parser.add_argument("--engine", choices=ENGINES, default="distributed",
                        help="distributed: reads and statistics in Ray tasks (the driver holds only fitted "
                             "objects); reference: the single-process builder (default: %(default)s)")
    parser.add_argument("--object-store-gb", type=float, default=None,
                        help="object store of a local Ray in GiB (default: Ray's); beyond it Ray spills to disk")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--num-cpus 0`` would leave Ray with no CPU to run on)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DatasetConfig, args.config, args.set)
    # errors (DataError, ConfigError, OutputError) are reported by pipeline.cli.main
    store = int(args.object_store_gb * (1 << 30)) if args.object_store_gb else None
    report = preprocess(cfg, args.raw, args.out, ray_num_cpus=args.num_cpus, ray_address=args.address,
                        engine=args.engine, object_store_memory=store)
    summary = {k: report[k] for k in ("splits", "vocab_sizes", "dedup", "rows_outside_splits", "timings_s")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out).resolve()}")
    return 0
