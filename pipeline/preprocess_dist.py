"""The distributed preprocessing builder: every log-sized step runs in Ray tasks; the driver
holds only fitted objects and small tables (per-block statistics, vocabularies, the encoded
side tables, the duplicate rows' numbers).

Phases (each a function below):

1. plan: the main and extra-row files are cut into row-aligned byte ranges (CSV) or row groups
   (Parquet), in the driver (no pass over the data);
2. read: each range is parsed, type-checked and labelled by the same functions as
   :func:`pipeline.preprocess.read_source`, its rows numbered from 1 and counted; from the
   counts the driver knows each range's first source row (blank lines are skipped by the CSV
   reader, so only the parse knows them); blocks stay in the object store (spilled to disk
   beyond it);
3. dedup: a shuffle by key (each block split into hash buckets of ``(keys, _row)``, one task
   per bucket finds the repeats in file order); the driver gets the dropped rows' numbers; one
   task per block then drops them and turns its row numbers into source row numbers;
4. side tables: one task each reads and checks a side table (item-sized, not log-sized);
5. scan (``split.kind: ordered`` only; otherwise part of the fit): per block, side-table
   matches and times, the rows per time value, from which
   :func:`pipeline.preprocess.ordered_split_counts` gives the split;
6. fit: per block, partial statistics of the training rows: distinct ids, dense moments,
   side-row hit counts per split, label counts, and per history group the sums per
   (key, day); combined in the driver (small) or, for history tables, by one task per group
   that writes the fitted table (:class:`~pipeline.transforms.HistoryGroup`) to ``artifacts/``;
7. side features: one task per side table fits its vocabularies, scalers, list encoders and
   PCA on the rows training rows join to, weighted by how often they do;
8. assemble (Ray Data): per block, encode, join, look up history windows and write Parquet;
   with ``numeric_bins``, count the training rows' dense values per bucket (first pass);
9. numeric bins: rounds of one task per written training file collect the values of the
   buckets the quantile edges fall in; the driver picks the exact order statistics
   (:func:`pipeline.transforms.buckets.edges_from_parts`; ties take a round more).

Bad input: a range only sees its own rows, so it cannot count a problem over a whole file as
the messages do ("...; 3 such row(s)"). A read check (a value that is no integer, a NaN, an
empty value, ...: :data:`pipeline.preprocess.READ_CHECKS`) is worded by the driver from every
piece's first failure (:func:`read_error`: the check the reference makes first among the failed
ones, its first row and its count over the file), with no file read in the driver; so is a key
without its side-table row (:func:`check_side_matches`). When another check finds bad input,
the reference builder (:func:`pipeline.preprocess.build_reference`) is run on the same files
and raises the error, worded exactly as always (an error path: it reads the files in this
process).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtl.features import WEIGHT_SUFFIX, DenseFeature, FeatureSpec, ListFeature, SparseFeature, VectorFeature
from pipeline import preprocess as pp
from pipeline.config import dump_config
from pipeline.datasets import TIME_UNIT_SUFFIX, DatasetConfig, FileConfig
from pipeline.errors import ConfigError, DataError
from pipeline.ray_runtime import ensure_ray
from pipeline.transforms import PCA, DenseScaler, HistoryGroup, ListEncoder, RowTransformer, SideTable, Vocabulary
from pipeline.transforms import history_feature_names
from pipeline.transforms.buckets import QuantileBoundaries, bucket_counts, bucket_values, edges_from_parts, feature_matrix
from pipeline.transforms.buckets import first_wanted, merge_collected, with_boundaries
from pipeline.transforms.dense import combine_moments, moments
from pipeline.transforms.history import history_group_from_sums

SPLITS = pp.SPLITS
PIECE_BYTES = 32 << 20  # a CSV range read by one task
DEDUP_BUCKETS = 16
LABEL = "_label__"  # a block's 0/1 (NaN: unlabelled) label columns
OTHER = "_other__"  # a block's "label value neither positive nor negative" flags
OUTSIDE = 3  # split-code slot of rows outside every split in per-split counts


class BadInput(Exception):
    """The distributed builder found bad input; the reference builder words the error."""


class WordedError(DataError):
    """Bad input worded over the whole input from the tasks' parts, as the reference builder
    words it, without running it."""


class FileReadError(WordedError, pp.RowCheckError):
    """A read check's error from the pieces' failures (:func:`read_error`)."""


# --------------------------------------------------------------------------------------------
# 1. plan


@dataclass(frozen=True)
class Piece:
    """A part of a main or extra-row file read by one task.

    Args:
        source: 0 for the main file, ``i`` for ``extra_rows[i - 1]``.
        path: the file.
        start, end: CSV: byte range of whole data lines; Parquet: ``start`` is the row group.
    """

    source: int
    path: str
    start: int
    end: int


def _csv_ranges(path: Path, piece_bytes: int) -> list[tuple[int, int]]:
    """Row-aligned byte ranges of the data lines of a CSV file (~``piece_bytes`` each)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.readline()
        cuts = [fh.tell()]
        pos = cuts[0] + piece_bytes
        while pos < size:
            fh.seek(pos)
            fh.readline()  # to the start of the next line
            if fh.tell() >= size:
                break
            cuts.append(fh.tell())
            pos = cuts[-1] + piece_bytes
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def row_files(cfg: DatasetConfig) -> list[FileConfig]:
    """The files whose rows are rows of the output: the main file, then the extra-row files."""
    return [cfg.main, *cfg.extra_rows]


def check_files(cfg: DatasetConfig, raw: Path) -> None:
    """File-level checks of every file (exists, not empty, header/schema, columns), before
    any Ray work. Raises:
        BadInput: a check failed."""
    needed = _needed(cfg)
    try:
        for fc in [*row_files(cfg), *cfg.side_tables]:
            path = pp.check_source_file(raw, fc)
            try:
                (pp.parquet_columns_check if path.suffix == ".parquet" else pp.csv_columns_check)(path, fc)
            except OSError as exc:
                raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
        for ex in cfg.extra_rows:
            if any(c not in ex.columns and c not in ex.assign for c in needed):
                raise DataError(f"{raw / ex.path}: a needed column is missing")
    except DataError as exc:
        raise BadInput(str(exc)) from None


def plan_pieces(cfg: DatasetConfig, raw: Path, piece_bytes: int) -> list[Piece]:
    """Pieces of the main and extra-row files in file order (CSV byte ranges of about
    ``piece_bytes``, Parquet row groups)."""
    pieces: list[Piece] = []
    for source, fc in enumerate(row_files(cfg)):
        path = raw / fc.path
        if path.suffix == ".parquet":
            pieces += [Piece(source, str(path), g, -1) for g in range(pq.ParquetFile(path).metadata.num_row_groups)]
        else:
            pieces += [Piece(source, str(path), a, b) for a, b in _csv_ranges(path, piece_bytes)]
    return pieces


# --------------------------------------------------------------------------------------------
# 2. read


def _needed(cfg: DatasetConfig) -> list[str]:
    """Main columns every row carries (the label columns are turned into labels)."""
    return [c for c in cfg.main.columns if c not in {lab.column for lab in cfg.labels}]


def main_types(cfg: DatasetConfig, raw: Path) -> dict[str, pa.DataType]:
    """The Arrow type of each main column after :func:`pipeline.preprocess.read_source`
    (extra rows are cast to it)."""
    path = raw / cfg.main.path
    types = {c: pp._ARROW_TYPES[k] for c, k in cfg.main.columns.items()}
    if path.suffix == ".parquet":
        schema = pq.read_schema(path)
        for c, kind in cfg.main.columns.items():
            t = schema.field(c).type
            if kind == "int" and (pa.types.is_integer(t) or pa.types.is_floating(t)):
                types[c] = t
    return types


def _read_checked(piece: Piece, path: Path, fc: FileConfig) -> pa.Table:
    """The piece's rows, typed and value-checked (an empty table when it has none).

    Raises:
        RowCheckError: a read check failed (rows of this piece).
    """
    try:
        if path.suffix == ".parquet":
            table = pp._read_parquet(path, fc, row_group=piece.start)
        else:
            with path.open("rb") as fh:
                header = fh.readline()
                fh.seek(piece.start)
                table = pp._read_csv(path, fc, header + fh.read(piece.end - piece.start))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    return table if table.num_rows == 0 else pp._check_values(path, fc, table)


@dataclass(frozen=True)
class ReadFailure:
    """The first read check (:data:`pipeline.preprocess.READ_CHECKS`) a piece failed.

    Args:
        source: the piece's file (index in :func:`row_files`); column: the column checked;
        problem: the check; row: the first failing row in the piece (1-based); count: failing
        rows in the piece; value, show_value: that row's value and whether the message shows it;
        rows: the piece's data rows (for the row offsets of the pieces after it).
    """

    source: int
    column: str
    problem: str
    row: int
    count: int
    value: Any
    show_value: bool
    rows: int

    def order(self, cfg: DatasetConfig) -> tuple[int, int, int, int]:
        """Where the reference builder, reading whole files, makes this check: by file, then
        stage (converting, then checking values), column, check."""
        stage, check = pp.READ_CHECKS[self.problem]
        return self.source, stage, list(row_files(cfg)[self.source].columns).index(self.column), check


def read_piece(piece: Piece, raw: Path, cfg: DatasetConfig, types: dict[str, pa.DataType]) -> tuple[pa.Table, int | ReadFailure]:
    """One piece as a block and its number of rows: the needed main columns (typed as the main
    file's), ``_row`` (the 1-based data row in the piece; :func:`_finish_block` adds the rows of
    the file before it), ``_source``, labels and unlisted-label flags. A piece without data
    rows (a range of blank lines, an empty row group) gives an empty table. A piece that fails
    a read check gives an empty table and the :class:`ReadFailure` (:func:`read_rows` words the
    error over every piece of the file).

    Raises:
        DataError: the label checks (row numbers and counts of this piece only: the reference
            builder words the error).
    """
    fc = row_files(cfg)[piece.source]
    path = Path(piece.path)
    try:
        table = _read_checked(piece, path, fc)
    except pp.RowCheckError as exc:
        if exc.problem not in pp.READ_CHECKS:
            raise
        return pa.table({}), ReadFailure(piece.source, exc.column, exc.problem, exc.row, exc.count, exc.value,
                                         exc.show_value, exc.rows_checked)
    if table.num_rows == 0:
        return pa.table({}), 0
    n = table.num_rows
    rows = pp._np(table["_row"])
    cols: dict[str, pa.Array] = {}
    for c in _needed(cfg):
        if c in table.column_names:
            cols[c] = pc.cast(table[c].combine_chunks(), types[c])
        else:  # an extra-row file's assigned column
            cols[c] = pa.array([fc.assign[c]] * n, type=types[c])
    cols["_row"] = pa.array(rows)
    cols["_source"] = pa.array(np.full(n, piece.source, np.int8))
    if piece.source == 0:
        labels = pp.label_matrix(cfg, table, path, rows, {})
    else:
        labels = np.full((n, len(cfg.labels)), np.nan, np.float32)
    for j, lab in enumerate(cfg.labels):
        cols[LABEL + lab.name] = pa.array(labels[:, j])
        if lab.positive is not None:
            if piece.source == 0:
                col = table[lab.column].combine_chunks()
                listed = pc.is_in(col, value_set=pa.array([*lab.positive, *(lab.negative or [])], type=col.type))
                cols[OTHER + lab.name] = pc.invert(listed)
            else:
                cols[OTHER + lab.name] = pa.array(np.zeros(n, dtype=bool))
    if table.num_rows != n:
        raise RuntimeError("rows changed while reading")
    return pa.table(cols), n


def read_rows(cfg: DatasetConfig, raw: Path, pieces: list[Piece]) -> tuple[list[Any], list[int]]:
    """Read every piece (one Ray task each); returns the refs of the blocks with rows, in file
    order (main file, then extra-row files), and per block the data rows of its file before it.
    Plain tasks, not a Ray Data read: a task's DataError then reaches the driver as a
    DataError (Ray Data wraps a UDF's exception in one that drops its class).

    Raises:
        FileReadError: a read check failed, worded over whole files (:func:`read_error`).
        BadInput: a file without data rows.
    """
    import ray

    task = ray.remote(read_piece).options(num_returns=2)
    types = main_types(cfg, raw)
    outs = [task.remote(p, raw, cfg, types) for p in pieces]
    counts = ray.get([n for _, n in outs])
    if any(isinstance(n, ReadFailure) for n in counts):
        raise read_error(cfg, pieces, counts)
    refs, offsets, before = [], [], [0] * len(row_files(cfg))
    for piece, (ref, _), n in zip(pieces, outs, counts):
        if n:
            refs.append(ref)
            offsets.append(before[piece.source])
            before[piece.source] += n
    if not all(before):
        raise BadInput("a file without data rows")
    return refs, offsets


def read_error(cfg: DatasetConfig, pieces: list[Piece], counts: list[int | ReadFailure]) -> FileReadError:
    """The error the reference builder raises for these pieces' read failures, from the pieces
    alone: the check it makes first among those that failed (:meth:`ReadFailure.order`) fails
    nowhere before, so its failing rows are those of the pieces whose first failure it is.

    Args:
        pieces: every piece, in file order; counts: per piece its rows or its failure.
    """
    before = [0] * len(row_files(cfg))
    placed: list[tuple[ReadFailure, int]] = []  # each failure with the rows of its file before its piece
    for piece, n in zip(pieces, counts):
        if isinstance(n, ReadFailure):
            placed.append((n, before[piece.source]))
        before[piece.source] += n.rows if isinstance(n, ReadFailure) else n
    first = min(f.order(cfg) for f, _ in placed)
    same = [(f, offset) for f, offset in placed if f.order(cfg) == first]
    f, offset = min(same, key=lambda p: p[1] + p[0].row)
    path = Path(next(p.path for p in pieces if p.source == f.source))
    return FileReadError(path, f.column, f.problem, offset + f.row, sum(g.count for g, _ in same), f.value,
                         f.show_value, before[f.source])


# --------------------------------------------------------------------------------------------
# 3. dedup


def _dedup_buckets(block: pa.Table, offset: int, keys: list[str], buckets: int) -> list[pa.Table]:
    main = block.filter(pc.equal(block["_source"], 0)).select([*keys, "_row"])
    main = main.set_column(len(keys), "_row", pc.add(main["_row"], offset))
    frame = main.select(keys).to_pandas()
    bucket = (pd.util.hash_pandas_object(frame, index=False).to_numpy() % np.uint64(buckets)).astype(np.int64)
    return [main.filter(pa.array(bucket == b)) for b in range(buckets)]


def _dedup_find(keep: str, keys: list[str], *parts: pa.Table) -> np.ndarray:
    """``_row`` of the repeats of one bucket (file order: ``keep`` first/last kept)."""
    frame = pa.concat_tables(parts).to_pandas().sort_values("_row", kind="stable")
    dup = frame.duplicated(keys, keep="first" if keep == "first" else "last").to_numpy()
    return frame["_row"].to_numpy()[dup]


def _finish_block(block: pa.Table, offset: int, dropped: np.ndarray | None) -> pa.Table:
    """The block with source row numbers (``offset`` added) and without the ``dropped`` main rows."""
    rows = pp._np(block["_row"]) + offset
    block = block.set_column(block.column_names.index("_row"), "_row", pa.array(rows))
    if dropped is None or not len(dropped):
        return block
    gone = (pp._np(block["_source"]) == 0) & np.isin(rows, dropped)
    return block.filter(pa.array(~gone)) if gone.any() else block


def dedup(cfg: DatasetConfig, refs: list[Any], offsets: list[int]) -> tuple[list[Any], dict[str, Any]]:
    """The blocks with source row numbers (``offsets``: :func:`read_rows`) and without the
    dropped repeats, and the report's ``dedup`` entry."""
    import ray

    finish = ray.remote(_finish_block)
    if cfg.dedup is None:
        return [finish.remote(r, o, None) for r, o in zip(refs, offsets)], {"duplicates": 0}
    keys, keep = cfg.dedup.keys, cfg.dedup.keep
    split = ray.remote(_dedup_buckets).options(num_returns=DEDUP_BUCKETS)
    parts = [split.remote(r, o, keys, DEDUP_BUCKETS) for r, o in zip(refs, offsets)]
    find = ray.remote(_dedup_find)
    found = ray.get([find.remote(keep, keys, *[p[b] for p in parts]) for b in range(DEDUP_BUCKETS)])
    dropped = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
    info = {"keys": keys, "keep": keep, "duplicates": int(len(dropped)), "dropped": 0}
    gone = None
    if keep != "all" and len(dropped):
        gone = ray.put(dropped)
        info["dropped"] = int(len(dropped))
    return [finish.remote(r, o, gone) for r, o in zip(refs, offsets)], info


# --------------------------------------------------------------------------------------------
# 4. side tables


def _read_side(raw: Path, cfg: DatasetConfig, si: int, keep: list[str]) -> tuple[pa.Table, dict[str, Any], dict[str, Any]]:
    """A side table (as :func:`pipeline.preprocess.read_source`), its list and vector
    columns parsed, and what rows need of it: its keys and the raw columns in ``keep``.
    Raises DataError on a repeated key or a malformed list/vector."""
    sc = cfg.side_tables[si]
    table = pp.read_source(raw, sc)
    keys = pp._np(table[sc.key])
    order = np.argsort(keys, kind="stable")
    if (keys[order][1:] == keys[order][:-1]).any():
        raise DataError(f"{raw / sc.path}: duplicate key")
    rows, path, csv_file = pp._np(table["_row"]), raw / sc.path, not sc.path.endswith(".parquet")
    parsed: dict[str, Any] = {}
    for f in cfg.lists:
        if f.column in sc.columns and f.column != sc.key:
            parsed[f.name] = pp._parse_list(table[f.column].combine_chunks(), f, path, rows, csv_file)
    for f in cfg.vectors:
        if f.column in sc.columns and f.column != sc.key:
            parsed[f.name] = pp._parse_vectors(table[f.column].combine_chunks(), f, path, rows, csv_file)
    return table, parsed, {"keys": keys, "rows": table.num_rows, "raw": {c: table[c].combine_chunks() for c in keep}}


@dataclass
class RowsContext:
    """What a row task needs besides its block: the config, each side table's keys and the
    side columns rows read (time, history keys, user, item), the split rule."""

    cfg: DatasetConfig
    side_keys: list[np.ndarray]
    side_raw: list[dict[str, pa.Array]]
    split_times: np.ndarray | None = None  # split.kind ordered: distinct times and their codes
    split_codes: np.ndarray | None = None

    def locate(self, column: str) -> int | None:
        """The side table a column comes from (None: the main rows)."""
        for i, sc in enumerate(self.cfg.side_tables):
            if column in sc.columns and column != sc.key:
                return i
        return None

    def positions(self, block: pa.Table) -> list[np.ndarray]:
        """Per side table, the side row of each block row (-1: no match)."""
        out = []
        for sc, keys in zip(self.cfg.side_tables, self.side_keys):
            index = pd.Index(keys)
            out.append(index.get_indexer(pp._np(block[sc.key])).astype(np.int64))
        return out

    def joined(self, block: pa.Table, pos: list[np.ndarray], column: str) -> np.ndarray:
        """Per-row values of a main or side column (None/NaN where a side row is missing)."""
        i = self.locate(column)
        if i is None:
            return pp._np(block[column])
        return pp._np(self.side_raw[i][column].take(pa.array(pos[i], mask=pos[i] < 0)))

    def days(self, block: pa.Table, pos: list[np.ndarray]) -> np.ndarray | None:
        return None if self.cfg.time is None else self.joined(block, pos, self.cfg.time).astype(np.int64)

    def split(self, block: pa.Table, days: np.ndarray | None) -> np.ndarray:
        """Split codes (0 train, 1 valid, 2 test, -1 none), as the reference assigns them."""
        sp, n = self.cfg.split, block.num_rows
        labelled = pp._np(block["_source"]) == 0
        split = np.full(n, -1, dtype=np.int8)
        if sp.kind == "day":
            for code, rng in enumerate((sp.train_days, sp.valid_days, sp.test_days)):
                if rng is not None:
                    split[(days >= rng[0]) & (days <= rng[1]) & (split < 0)] = code
        elif sp.kind == "ordered":
            split[:] = 2
            at = np.searchsorted(self.split_times, days[labelled])
            split[labelled] = self.split_codes[at]
        else:
            src = pp._np(block["_source"]).astype(np.int64)
            u = pp.hash_uniform(sp.seed, 0, src * (1 << 40) + pp._np(block["_row"]))
            split[:] = 0
            split[u < sp.valid_fraction + sp.test_fraction] = 1
            split[u < sp.test_fraction] = 2
            split[~labelled] = 2
        return split

    def keep(self, block: pa.Table, split: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows kept by negative sampling, and the per-action keep masks."""
        ns = self.cfg.negative_sampling
        if ns is None:
            return np.ones(block.num_rows, dtype=bool), {}
        gid = pp._np(block["_source"]).astype(np.int64) * (1 << 40) + pp._np(block["_row"])
        kept_any = np.zeros(block.num_rows, dtype=bool)
        masks = {}
        for j, lab in enumerate(self.cfg.labels):
            y = pp._np(block[LABEL + lab.name])
            keep_a = (y == 1) | (pp.hash_uniform(ns.seed, 1 + j, gid) < ns.rates.get(lab.name, 1.0))
            kept_any |= keep_a
            masks[lab.name] = keep_a
        return np.where(split == 0, kept_any, True), masks


# --------------------------------------------------------------------------------------------
# 5. scan


def _scan_block(block: pa.Table, ctx: RowsContext) -> dict[str, Any]:
    """Side matches (missing counts; an error where not allowed), times: the block's part of
    what the split and the history tables need."""
    cfg = ctx.cfg
    pos = ctx.positions(block)
    out: dict[str, Any] = {"missing": [int((p < 0).sum()) for p in pos], "first_missing": []}
    for sc, p in zip(cfg.side_tables, pos):  # rows of one file, in file order: the first is the block's first
        first = None
        if sc.on_missing == "error" and (p < 0).any():
            i = int(np.flatnonzero(p < 0)[0])
            first = (int(block["_source"][i].as_py()), int(block["_row"][i].as_py()), block[sc.key][i].as_py())
        out["first_missing"].append(first)  # (source, row, key value): check_side_matches words the error
    if _unmatched(out):
        return out  # the driver raises on it: no more of this block is used (nor valid without side rows)
    days = ctx.days(block, pos)
    if days is not None:
        if len(days) and days.min() < 0:
            raise BadInput("negative time")
        labelled = pp._np(block["_source"]) == 0
        out["max_day"] = int(days.max()) if len(days) else None
        out["max_labelled_day"] = int(days[labelled].max()) if labelled.any() else None
        if cfg.split.kind == "ordered":
            out["times"] = np.unique(days[labelled], return_counts=True)
    return out


def _unmatched(scan: dict[str, Any]) -> bool:
    """The scanned block has a key without its side row where that is an error."""
    return any(f is not None for f in scan["first_missing"])


def check_side_matches(cfg: DatasetConfig, raw: Path, scans: list[dict[str, Any]]) -> None:
    """Every row has its side-table row where ``on_missing: error``; else the reference builder's
    error from the blocks' scans: the first side table with a missing key, the first such row
    in file order, the count over all rows.

    Raises:
        WordedError: a key without a side row.
    """
    for k, sc in enumerate(cfg.side_tables):
        firsts = [s["first_missing"][k] for s in scans if s["first_missing"][k] is not None]
        if firsts:
            source, row, value = min(firsts, key=lambda f: (f[0], f[1]))
            path = raw / row_files(cfg)[source].path
            count = sum(s["missing"][k] for s in scans)
            raise WordedError(pp.missing_key_message(sc.key, raw / sc.path, path, row, value, count))


# --------------------------------------------------------------------------------------------
# 6. fit: per-block partial statistics


def _by_split(mask: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Counts of ``mask`` rows per split slot (0, 1, 2, OUTSIDE)."""
    slot = np.where(split < 0, OUTSIDE, split)
    return np.bincount(slot[mask], minlength=4).astype(np.int64)


def _history_partial(block: pa.Table, ctx: RowsContext, pos: list[np.ndarray], days: np.ndarray,
                     rows: np.ndarray, keys: list[str]) -> pa.Table:
    """Sums per (key values, day) of impressions and actions over the history rows."""
    frame = {f"k{i}": ctx.joined(block, pos, k)[rows] for i, k in enumerate(keys)}
    for i, k in enumerate(keys):
        if pd.isna(frame[f"k{i}"]).any():
            raise BadInput(f"history key {k!r} is missing")
    frame["day"] = days[rows]
    frame["n"] = np.ones(int(rows.sum()), dtype=np.float64)
    for a in ctx.cfg.history_actions:
        frame[a] = pp._np(block[LABEL + a])[rows].astype(np.float64)
    df = pd.DataFrame(frame)
    sums = df.groupby([*(f"k{i}" for i in range(len(keys))), "day"], sort=False).sum().reset_index()
    return pa.Table.from_pandas(sums, preserve_index=False)


def _fit_block(block: pa.Table, ctx: RowsContext) -> tuple[Any, ...]:
    """The block's partial statistics (a dict, with :func:`_scan_block`'s under ``scan``) and,
    per history group, its partial sums."""
    cfg = ctx.cfg
    scan = _scan_block(block, ctx)
    if _unmatched(scan):  # keys without side rows: the driver raises
        empty = [pa.table({}) for _ in (cfg.history.keys if cfg.history else [])]
        return ({"scan": scan, "side": []}, *empty) if empty else {"scan": scan, "side": []}
    pos = ctx.positions(block)
    days = ctx.days(block, pos)
    split = ctx.split(block, days)
    labelled = pp._np(block["_source"]) == 0
    if ((~labelled) & (split == 0)).any():
        raise BadInput("unlabelled row in the training split")
    train = split == 0
    keep, masks = ctx.keep(block, split)
    st: dict[str, Any] = {"scan": scan, "sources": np.bincount(pp._np(block["_source"]).astype(np.int64), minlength=len(row_files(cfg))),
                          "rows": _by_split(np.ones(len(split), bool), split), "labelled": _by_split(labelled, split),
                          "kept": _by_split(keep, split), "kept_labelled": _by_split(keep & labelled, split)}
    labels = {lab.name: pp._np(block[LABEL + lab.name]) for lab in cfg.labels}
    st["positives"] = {n: _by_split(labelled & (y == 1), split) for n, y in labels.items()}
    st["label_sums"] = {n: np.bincount(np.where(split < 0, OUTSIDE, split)[keep & labelled],
                                       weights=y[keep & labelled].astype(np.float64), minlength=4) for n, y in labels.items()}
    st["other"] = {lab.name: int(pp._np(block[OTHER + lab.name]).sum()) for lab in cfg.labels if OTHER + lab.name in block.column_names}
    st["sampling"] = {n: (int((train & (labels[n] == 0)).sum()), int((train & (labels[n] == 0) & m).sum()))
                      for n, m in masks.items()}
    st["sparse"] = {}
    for f in cfg.sparse:
        if ctx.locate(f.column) is None:
            values = block[f.column].combine_chunks()
            st["sparse"][f.name] = (pc.unique(values.filter(pa.array(train)).drop_null()),
                                    _by_split(np.asarray(pc.is_null(values)), split))
    st["dense"] = {}
    for f in cfg.dense:
        if ctx.locate(f.column) is None:
            v = pp._np(pc.cast(block[f.column].combine_chunks(), pa.float64())).astype(np.float64)
            nulls = np.isnan(v)
            v = np.where(nulls, 0.0, v)
            scaler = DenseScaler(f.transform)
            if scaler.invalid(v).any():
                raise BadInput(f"{f.column}: log1p needs values >= 0")
            st["dense"][f.name] = (int(nulls.sum()), moments(scaler.prepared(v[train])))
    st["side"] = []
    slot = np.where(split < 0, OUTSIDE, split)
    for p, keys in zip(pos, ctx.side_keys):
        hit = p >= 0
        n_side = len(keys)
        counts = np.stack([np.bincount(p[hit & (slot == k)], minlength=n_side) for k in range(4)]).astype(np.int32)
        st["side"].append((counts, _by_split(~hit, split)))
    partials: list[pa.Table] = []
    if cfg.history is not None:
        hist_rows = pp.history_rows(cfg.history.protocol, labelled, split)
        st["hist_rows"] = _by_split(hist_rows, split)
        partials = [_history_partial(block, ctx, pos, days, hist_rows, keys) for keys in cfg.history.keys]
    return (st, *partials) if partials else st


def _sum_counts(parts: list[dict[str, Any]], key: str) -> Any:
    return sum(p[key] for p in parts)


def _reduce_history(name: str, keys: list[str], day_base: int, windows: list[int], stats: list[str],
                    path: str, *partials: pa.Table) -> tuple[HistoryGroup, int]:
    """One history table from the blocks' partial sums, saved to ``path`` (by this task: the
    table never passes through the driver)."""
    for i in range(len(keys)):  # a block with a missing side row holds float keys (NaN), as the reference does
        if any(pa.types.is_floating(p.schema.field(f"k{i}").type) for p in partials):
            partials = tuple(p.set_column(i, f"k{i}", pc.cast(p[f"k{i}"], pa.float64())) for p in partials)
    t = pa.concat_tables(partials, promote_options="default")
    sums = np.stack([pp._np(t[c]).astype(np.float64) for c in t.column_names[len(keys) + 1:]], axis=1)
    g = history_group_from_sums(name, keys, [pp._np(t[f"k{i}"]) for i in range(len(keys))], pp._np(t["day"]),
                                sums, day_base)
    g.windows, g.stats = list(windows), list(stats)
    g.save(path)
    return g, len(g.comb)


# --------------------------------------------------------------------------------------------
# 7. side features


def _fit_side(table: pa.Table, parsed: dict[str, Any], si: int, cfg: DatasetConfig, counts: np.ndarray,
              missing: np.ndarray, hist_keys: list[str], artifacts: str) -> tuple[SideTable | None, dict[str, Any]]:
    """Fit the side table's features on the side rows training rows join to (dense scalers
    weighted by how many training rows join each), as the reference does; save their
    artifacts; return the encoded :class:`SideTable` and the report's entries.

    Args:
        table: the side table; parsed: its parsed lists and vectors; si: its index; counts: ``[4, side rows]`` rows joined per
        split slot; missing: rows without a match per split slot; hist_keys: history keys.
    """
    sc = cfg.side_tables[si]
    mine = [c for c in sc.columns if c != sc.key]
    train_counts = counts[0]
    tmask = train_counts > 0
    feats: dict[str, pa.Array] = {}
    fill: dict[str, int] = {}
    info: dict[str, Any] = {"vocab_sizes": {}, "oov": {}, "missing_oov": {}, "repairs": {}, "dense_stats": {},
                            "lists": {}, "pca": {}, "truncated": {}}

    def per_split(per_side_row: np.ndarray) -> dict[str, int]:
        return {s: int((counts[k] * per_side_row).sum()) for k, s in enumerate(SPLITS)}

    for f in cfg.sparse:
        if f.column in mine:
            values = table[f.column].combine_chunks()
            vocab = Vocabulary().fit(values.filter(pa.array(tmask)))
            if vocab.size == 0:
                raise DataError(f"sparse feature {f.name!r}: no values in training rows")
            enc = vocab.transform(values)
            feats[f.name], fill[f.name] = pa.array(enc), vocab.size
            null_side = np.asarray(pc.is_null(values))
            info["oov"][f.name] = per_split(~null_side & (enc == vocab.size))
            row_null = {s: int(missing[k] + (counts[k] * null_side).sum()) for k, s in enumerate([*SPLITS, "outside"])}
            if any(row_null.values()):
                info["missing_oov"][f.name] = {s: row_null[s] for s in SPLITS}
            info["vocab_sizes"][f.name] = vocab.size
            vocab.save(Path(artifacts) / f"vocab_{f.name}.parquet")
    for f in cfg.dense:
        if f.column in mine:
            v = pp._np(pc.cast(table[f.column].combine_chunks(), pa.float64())).astype(np.float64)
            nulls = np.isnan(v)
            if nulls.any():
                info["repairs"][f"{sc.path}: {f.column} empty -> 0 (before scaling)"] = int(nulls.sum())
                v = np.where(nulls, 0.0, v)
            scaler = DenseScaler(f.transform)
            if scaler.invalid(v).any():
                raise DataError(f"{f.column}: log1p needs values >= 0")
            scaler.fit(np.repeat(v, train_counts))  # once per training row joined to it
            info["dense_stats"][f.name] = scaler.to_dict()
            feats[f.name] = pa.array(scaler.transform(v))
    for f in cfg.lists:
        if f.column in mine:
            ids, weights = parsed[f.name]
            lengths = pp._np(pc.list_value_length(ids))
            trunc = lengths > f.max_len
            encoder = ListEncoder(f.max_len).fit(ids.filter(pa.array(tmask)))
            if encoder.size == 0:
                raise DataError(f"list feature {f.name!r}: no ids in training rows")
            enc, weights = encoder.transform(ids, weights)
            flat = pp._np(pc.list_flatten(enc))
            parents = pp._np(pc.list_parent_indices(enc)) if len(flat) else np.zeros(0, np.int64)
            oov_entries = np.bincount(parents, weights=(flat == encoder.size), minlength=len(ids)).astype(np.int64)
            info["oov"][f.name] = per_split(oov_entries)
            info["truncated"][f.name] = int(trunc.sum())
            info["lists"][f.name] = {"empty_lists": int((lengths == 0).sum()), "truncated": int(trunc.sum()),
                                     "max_len": f.max_len, "table_rows": len(lengths)}
            info["vocab_sizes"][f.name] = encoder.size
            encoder.save(Path(artifacts) / f"vocab_{f.name}.parquet")
            feats[f.name] = enc
            if f.weighted:
                feats[f.name + WEIGHT_SUFFIX] = weights
    for f in cfg.vectors:
        if f.column in mine:
            mat = parsed[f.name]
            if f.pca_dim is not None:
                pca = PCA(f.pca_dim).fit(mat[tmask])
                mat = pca.transform(mat)
                pca.save(Path(artifacts) / f"pca_{f.name}.npz")
                info["pca"][f.name] = {"fit_rows": int(tmask.sum()), "dim": f.pca_dim,
                                       "explained_variance": float(pca.explained_variance_ratio.sum())}
            info.setdefault("dims", {})[f.name] = mat.shape[1]
            feats[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1).astype(np.float32)), mat.shape[1])
    raw_keep = {k: table[k].combine_chunks() for k in sorted(hist_keys) if k in mine}
    side = SideTable.fit(sc.key, table[sc.key].combine_chunks(), feats, fill, raw_keep) if feats or raw_keep else None
    return side, info


# --------------------------------------------------------------------------------------------
# 8. assemble


@dataclass
class AssembleContext:
    """What an assembly task needs: the rows context, the fitted main-row objects, the side
    tables, the history tables (object refs, fetched once per worker) and the layout."""

    rows: RowsContext
    sparse: dict[str, tuple[str, Vocabulary]]
    dense: dict[str, tuple[str, DenseScaler]]
    sides: list[SideTable]
    side_index: list[int]  # the config's side-table index of each entry of ``sides``
    history: list[Any]  # object refs of HistoryGroup
    orders: dict[str, list[str]]
    out_dir: str
    bins: list[tuple[str, int]]  # numeric_bins: the dense features (name, width) whose training values are counted


_GROUPS: dict[str, list[HistoryGroup]] = {}


def _groups(refs: list[Any]) -> list[HistoryGroup]:
    import ray

    key = ",".join(r.hex() for r in refs)
    if key not in _GROUPS:
        _GROUPS.clear()
        _GROUPS[key] = ray.get(refs)
    return _GROUPS[key]


def _assemble(block: pa.Table, ctx: AssembleContext) -> dict[str, Any]:
    """Encode, join and write one block (one file per split and ``rows_per_block`` rows);
    returns rows written per split and the main sparse features' OOV counts per split."""
    rc, cfg = ctx.rows, ctx.rows.cfg
    pos = rc.positions(block)
    days = rc.days(block, pos)
    split = rc.split(block, days)
    keep, masks = rc.keep(block, split)
    groups = _groups(ctx.history)
    cols: dict[str, pa.Array] = {"_row": block["_row"].combine_chunks()}
    if cfg.user is not None:
        cols["_user"] = pa.array(rc.joined(block, pos, cfg.user))
    if cfg.item is not None:
        cols["_item"] = pa.array(rc.joined(block, pos, cfg.item))
    if days is not None:
        cols["_day"] = pa.array(days)
    oov: dict[str, np.ndarray] = {}
    for name, (column, vocab) in ctx.sparse.items():
        values = block[column].combine_chunks()
        enc = vocab.transform(values)
        cols[name] = pa.array(enc)
        oov[name] = _by_split(~np.asarray(pc.is_null(values)) & (enc == vocab.size), split)
    for name, (column, scaler) in ctx.dense.items():
        v = pp._np(pc.cast(block[column].combine_chunks(), pa.float64())).astype(np.float64)
        cols[name] = pa.array(scaler.transform(np.where(np.isnan(v), 0.0, v)))
    for side in ctx.sides:
        cols["_key__" + side.key] = block[side.key].combine_chunks()
    for g in groups:
        cols[f"_hk_{g.name}"] = pa.array(g.row_codes([rc.joined(block, pos, k) for k in g.keys]))
    for lab in cfg.labels:
        cols[lab.name] = block[LABEL + lab.name].combine_chunks()
    for name, m in masks.items():
        cols[pp.MASK_PREFIX + name] = pa.array(m.astype(np.float32))
    table = pa.table(cols)
    actx = pp.AssemblyContext(ctx.sides, groups, ctx.orders)
    written, bins = {}, {}
    # file names in file order: source, then the block's first row
    stem = f"part-{int(pp._np(block['_source'])[0]):02d}-{int(pp._np(block['_row'])[0]):012d}"
    for code, sname in enumerate(SPLITS):
        part = table.filter(pa.array((split == code) & keep))
        written[sname] = part.num_rows
        for k, start in enumerate(range(0, part.num_rows, cfg.rows_per_block)):
            b = part.slice(start, cfg.rows_per_block)
            b = b.append_column("_split", pa.array(np.full(b.num_rows, code, np.int8)))
            out = pp.assemble_block(b, actx)
            if code == 0:  # numeric_bins' first pass over the training rows, while they are in memory
                for name, dim in ctx.bins:
                    counts = bucket_counts(feature_matrix(out[name], dim))
                    bins[name] = bins[name] + counts if name in bins else counts
            pp.write_part(out, Path(ctx.out_dir) / sname / f"{stem}-{k:03d}.parquet")
    return {"rows": written, "oov": oov, "bins": bins}


def _assemble_batch(block: pa.Table, ctx: Any) -> pa.Table:
    """Ray Data: one block -> one row with its results (pickled)."""
    import pickle

    result = _assemble(block, pp._resolve_ctx(ctx)) if block.num_rows else None
    return pa.table({"result": pa.array([pickle.dumps(result)], type=pa.binary())})


# --------------------------------------------------------------------------------------------
# the driver


def _unwrap(exc: BaseException) -> BaseException | None:
    """The DataError/ConfigError/BadInput a Ray task raised, if that is what ``exc`` carries."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, (BadInput, DataError, ConfigError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def build_distributed(cfg: DatasetConfig, raw: Path, tmp: Path, ray_num_cpus: int | None = None,
                      ray_address: str | None = None, object_store_memory: int | None = None,
                      piece_bytes: int | None = None) -> dict[str, Any]:
    """Build the output in ``tmp`` (see the module docstring); returns the report.

    Args:
        cfg, raw, tmp: as :func:`pipeline.preprocess.build_reference`.
        ray_num_cpus, ray_address, object_store_memory: see :func:`pipeline.ray_runtime.ensure_ray`.
        piece_bytes: bytes of a CSV range read by one task (default :data:`PIECE_BYTES`).

    Raises:
        DataError: bad input, worded by the reference builder.
    """
    main_lists = [f.name for f in [*cfg.lists, *cfg.vectors] if not any(
        f.column in sc.columns and f.column != sc.key for sc in cfg.side_tables)]
    if main_lists:  # list/vector features of main rows: only the reference parses them
        report = pp.build_reference(cfg, raw, tmp, ray_num_cpus, ray_address)
        report["engine"] = f"reference (main-row list/vector features {main_lists})"
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        return report
    try:
        return _build(cfg, raw, tmp, ray_num_cpus, ray_address, object_store_memory, piece_bytes or PIECE_BYTES)
    except WordedError:  # worded over the whole input already (read checks, side-table matches)
        raise
    except Exception as exc:  # noqa: BLE001 - bad input found in a task or the driver
        found = _unwrap(exc)
        if found is None:
            raise
    for child in list(tmp.iterdir()):  # the reference builds from an empty folder
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    pp.build_reference(cfg, raw, tmp, ray_num_cpus, ray_address)
    raise RuntimeError(f"the distributed builder found bad input ({found}) that the reference builder accepted")


def _build(cfg: DatasetConfig, raw: Path, tmp: Path, ray_num_cpus: int | None, ray_address: str | None,
           object_store_memory: int | None, piece_bytes: int) -> dict[str, Any]:
    import ray

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    check_files(cfg, raw)
    ensure_ray(num_cpus=ray_num_cpus, address=ray_address, object_store_memory=object_store_memory)
    report: dict[str, Any] = {"dataset": cfg.name, "raw": str(raw.resolve()), "attribution": cfg.attribution,
                              "engine": "distributed",
                              "ray": {"gcs_address": ray.get_runtime_context().gcs_address}}
    t = tick("ray_init", t_start)
    pieces = plan_pieces(cfg, raw, piece_bytes)
    t = tick("plan", t)
    sides = _read_sides(cfg, raw)  # side tables read while the rows are
    refs, offsets = read_rows(cfg, raw, pieces)
    refs, report["dedup"] = dedup(cfg, refs, offsets)
    t = tick("read_rows_dedup", t)
    ctx, side_meta = _rows_context(cfg, sides)
    t = tick("read_side", t)
    if cfg.split.kind == "ordered":  # the split needs every block's times first
        ctx_ref = ray.put(ctx)
        scans = ray.get([ray.remote(_scan_block).remote(r, ctx_ref) for r in refs])
        check_side_matches(cfg, raw, scans)
        _set_split_rule(cfg, ctx, scans, report)
        t = tick("scan", t)
    fit = _fit(cfg, ctx, refs, sides, side_meta, raw, tmp, report)
    del sides  # the raw side tables: encoded copies are in the fitted objects; free the object store
    t = tick("fit", t)
    results = _write(cfg, ctx, refs, fit, tmp, report)
    t = tick("assemble_write", t)
    if cfg.numeric_bins is not None:  # quantile edges of the written training rows, as the reference builder
        fit.spec = _fit_bins(fit.spec, results, tmp / "train", cfg.numeric_bins, tmp / "artifacts")
    fit.spec.save(tmp / "feature_spec.json")
    tick("numeric_bins", t)
    report["timings_s"] = {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()}
    report["config"] = json.loads(json.dumps(cfg.model_dump(mode="json")))
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (tmp / "dataset_config.yaml").write_text(dump_config(cfg))
    return report


def _read_sides(cfg: DatasetConfig, raw: Path) -> list[tuple[Any, Any, Any]]:
    """Start reading the side tables, one task each: refs of (table, parsed lists/vectors,
    what rows need: keys and the raw columns rows read)."""
    import ray

    wanted = {c for c in [cfg.time, cfg.user, cfg.item, *(k for ks in (cfg.history.keys if cfg.history else []) for k in ks)] if c}
    task = ray.remote(_read_side).options(num_returns=3)
    return [task.remote(raw, cfg, si, sorted(c for c in wanted if c in sc.columns and c != sc.key))
            for si, sc in enumerate(cfg.side_tables)]


def _rows_context(cfg: DatasetConfig, sides: list[tuple[Any, Any, Any]]) -> tuple[RowsContext, list[dict[str, Any]]]:
    """The context row tasks need, from the side tables' keys and raw columns."""
    import ray

    metas = ray.get([m for _, _, m in sides])
    return RowsContext(cfg, [m["keys"] for m in metas], [m["raw"] for m in metas]), metas


def _set_split_rule(cfg: DatasetConfig, ctx: RowsContext, scans: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Ordered splits: the split of each distinct time, from the blocks' counts per time."""
    if cfg.split.kind != "ordered":
        return
    times = np.concatenate([s["times"][0] for s in scans])
    counts = np.concatenate([s["times"][1] for s in scans])
    uniq, inv = np.unique(times, return_inverse=True)
    total = np.bincount(inv.reshape(-1), weights=counts, minlength=len(uniq)).astype(np.int64)
    ctx.split_codes, report["split_boundaries"] = pp.ordered_split_counts(
        uniq, total, cfg.split.valid_fraction, cfg.split.test_fraction)
    ctx.split_times = uniq


@dataclass
class Fitted:
    """What the fit phase gives the write phase."""

    main_sparse: dict[str, tuple[str, Vocabulary]]
    main_dense: dict[str, tuple[str, DenseScaler]]
    sides: list[SideTable]
    side_index: list[int]
    history: list[Any]
    history_files: list[str]
    spec: FeatureSpec
    feature_cols: list[str]
    rows: np.ndarray  # per split slot
    labelled_rows: np.ndarray
    kept_rows: np.ndarray
    kept_labelled: np.ndarray
    serve_day: int | None
    unsupported: list[str]


def _fit(cfg: DatasetConfig, ctx: RowsContext, refs: list[Any], sides: list[tuple[Any, Any, Any]], side_meta: list[dict[str, Any]], raw: Path, tmp: Path,
         report: dict[str, Any]) -> Fitted:
    """Partial statistics per block, combined; side features and history tables fitted in tasks."""
    import ray

    n_groups = len(cfg.history.keys) if cfg.history else 0
    fit_task = ray.remote(_fit_block).options(num_returns=1 + n_groups)
    ctx_ref = ray.put(ctx)
    outs = [fit_task.remote(r, ctx_ref) for r in refs]
    outs = [o if n_groups else [o] for o in outs]
    # fetched one block at a time: the per-side-row counts are summed as they come, so the
    # driver never holds every block's copy
    parts, side_sums = [], [[0, 0] for _ in cfg.side_tables]
    for o in outs:
        part = ray.get(o[0])
        for i, (hits, missing) in enumerate(part.pop("side")):
            side_sums[i][0] = side_sums[i][0] + hits
            side_sums[i][1] = side_sums[i][1] + missing
        parts.append(part)
    scans = [p.pop("scan") for p in parts]
    check_side_matches(cfg, raw, scans)
    counts = _combine_counts(cfg, parts, scans, side_meta, raw, report)
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    # the tasks first (side features, history tables), the driver's small work meanwhile
    fit_side = ray.remote(_fit_side).options(num_returns=2)
    hist_keys = sorted({k for keys in (cfg.history.keys if cfg.history else []) for k in keys})
    side_outs = [fit_side.remote(sides[i][0], sides[i][1], i, cfg, side_sums[i][0], side_sums[i][1], hist_keys,
                                 str(artifacts)) for i in range(len(cfg.side_tables))]
    history = _start_history(cfg, outs, scans, parts, artifacts, report)
    main_sparse, main_dense, dense_stats, main_nulls = _fit_main(cfg, ctx, parts, artifacts, counts["repairs"])
    side_infos = ray.get([o[1] for o in side_outs])
    fitted_sides = ray.get([o[0] for o in side_outs])
    for info in side_infos:
        counts["repairs"].update(info["repairs"])
        dense_stats.update(info["dense_stats"])
    (artifacts / "dense_stats.json").write_text(json.dumps(dense_stats, indent=2))
    spec, feature_cols = _spec(cfg, main_sparse, main_nulls, side_infos, history["spec"], report)
    report["repairs"] = counts["repairs"]
    if cfg.history is not None:
        report["history"]["table_rows"] = dict(zip(report["history_columns"], ray.get(history["sizes"])))
    report["_oov_pending"] = list(main_sparse)
    max_labelled = max((s["max_labelled_day"] for s in scans if s.get("max_labelled_day") is not None), default=None)
    return Fitted(main_sparse, main_dense, [s for s in fitted_sides if s is not None],
                  [i for i, s in enumerate(fitted_sides) if s is not None], history["groups"], history["files"], spec,
                  feature_cols, counts["rows"], counts["labelled"], counts["kept"], counts["kept_labelled"],
                  max_labelled + 1 if max_labelled is not None else None, [])


def _combine_counts(cfg: DatasetConfig, parts: list[dict[str, Any]], scans: list[dict[str, Any]],
                    side_meta: list[dict[str, Any]], raw: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Row, label and repair counts over all blocks; the split checks (errors and warnings);
    the report's inputs, label rates and sampling entries."""
    lab_names = [lab.name for lab in cfg.labels]
    c: dict[str, Any] = {k: _sum_counts(parts, k) for k in ("rows", "labelled", "kept", "kept_labelled", "sources")}
    rows, labelled, kept, kept_labelled = c["rows"], c["labelled"], c["kept"], c["kept_labelled"]
    report["inputs"] = {cfg.main.path: int(c["sources"][0]) + report["dedup"].get("dropped", 0)}
    for i, ex in enumerate(cfg.extra_rows, start=1):
        report["inputs"][ex.path] = int(c["sources"][i])
    for sc, meta in zip(cfg.side_tables, side_meta):
        report["inputs"][sc.path] = meta["rows"]
    repairs: dict[str, int] = {}
    for lab in cfg.labels:
        other = sum(p["other"].get(lab.name, 0) for p in parts)
        if other:
            repairs[f"{cfg.main.path}: {lab.column} values neither positive nor negative -> 0 "
                    f"(label {lab.name}, unlisted: negative)"] = other
    for i, sc in enumerate(cfg.side_tables):
        missing = sum(s["missing"][i] for s in scans)
        if missing:
            repairs[f"{sc.path}: rows without a {sc.key} match (side features missing -> OOV/0/empty)"] = missing
    c["repairs"] = repairs
    if not rows[0]:
        raise BadInput("no training rows")
    positives = {n: sum(p["positives"][n] for p in parts) for n in lab_names}
    report["warnings"] = pp.check_split_counts(
        cfg, raw / cfg.main.path, {k: int(rows[k]) for k in range(3)}, {k: int(labelled[k]) for k in range(3)},
        {k: [int(positives[n][k]) for n in lab_names] for k in range(3)})
    report["rows_outside_splits"] = int(rows[OUTSIDE])
    sampling = None
    if cfg.negative_sampling is not None:
        ns = cfg.negative_sampling
        sampling = {"seed": ns.seed, "rates": ns.rates, "per_action": {}}
        for n in lab_names:
            neg, kept_neg = (sum(p["sampling"][n][i] for p in parts) for i in range(2))
            sampling["per_action"][n] = {"rate": ns.rates.get(n, 1.0), "train_negatives": neg, "kept_negatives": kept_neg}
        sampling["train_rows_before"] = int(rows[0])
        sampling["train_rows_after"] = int(kept[0])
    report["negative_sampling"] = sampling
    label_sums = {n: sum(p["label_sums"][n] for p in parts) for n in lab_names}
    report.update({
        "rows": {"main_after_dedup": int(labelled.sum()), "extra": int((rows - labelled).sum())},
        "split_rule": cfg.split.model_dump(),
        "label_rates": {s: {n: float(label_sums[n][k] / kept_labelled[k]) if kept_labelled[k] else float("nan")
                            for n in lab_names}
                        for k, s in enumerate(SPLITS) if labelled[k]},
    })
    return c


def _fit_main(cfg: DatasetConfig, ctx: RowsContext, parts: list[dict[str, Any]], artifacts: Path,
              repairs: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Main-row vocabularies (union of the blocks' distinct training ids) and dense scalers
    (combined moments); returns them, the dense stats and the null counts per split."""
    main_sparse: dict[str, tuple[str, Vocabulary]] = {}
    nulls_by_split: dict[str, np.ndarray] = {}
    for f in cfg.sparse:
        if ctx.locate(f.column) is None:
            vocab = Vocabulary().fit(pa.concat_arrays([p["sparse"][f.name][0] for p in parts]))
            if vocab.size == 0:
                raise BadInput(f"sparse feature {f.name}: no values in training rows")
            vocab.save(artifacts / f"vocab_{f.name}.parquet")
            main_sparse[f.name] = (f.column, vocab)
            nulls_by_split[f.name] = sum(p["sparse"][f.name][1] for p in parts)
    main_dense: dict[str, tuple[str, DenseScaler]] = {}
    dense_stats: dict[str, Any] = {}
    for f in cfg.dense:
        if ctx.locate(f.column) is None:
            nulls = sum(p["dense"][f.name][0] for p in parts)
            if nulls:
                repairs[f"{cfg.main.path}: {f.column} empty -> 0 (before scaling)"] = nulls
            n, mean, m2 = combine_moments([p["dense"][f.name][1] for p in parts])
            scaler = DenseScaler(f.transform).fit_moments(n, float(mean), float(m2))
            dense_stats[f.name] = scaler.to_dict()
            main_dense[f.name] = (f.column, scaler)
    return main_sparse, main_dense, dense_stats, nulls_by_split


def _start_history(cfg: DatasetConfig, outs: list[list[Any]], scans: list[dict[str, Any]], parts: list[dict[str, Any]],
                   artifacts: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Start one task per history key group on the blocks' partial sums; the report's history
    entries; returns the tasks' refs (tables, sizes), their files and the spec entries."""
    import ray

    out: dict[str, Any] = {"groups": [], "sizes": [], "files": [], "spec": []}
    report["history"], report["history_columns"] = None, {}
    if cfg.history is None:
        return out
    fed = sum(p["hist_rows"] for p in parts)
    report["history"] = {
        "protocol": cfg.history.protocol, "time_unit": cfg.time_unit, "windows": cfg.history.windows,
        "rows_fed": int(fed.sum()),
        "rows_fed_by_split": {s: int(fed[k]) for k, s in enumerate(SPLITS)} | {"outside_splits": int(fed[OUTSIDE])},
    }
    day_base = max(s["max_day"] for s in scans if s.get("max_day") is not None) + 2
    reduce = ray.remote(_reduce_history).options(num_returns=2)
    for gi, keys in enumerate(cfg.history.keys):
        name = "hist_" + "_".join(keys)
        fname = f"history_{name}.npz"
        group, size = reduce.remote(name, keys, day_base, cfg.history.windows, cfg.history.stats,
                                    str(artifacts / fname), *[o[1 + gi] for o in outs])
        out["groups"].append(group)
        out["sizes"].append(size)
        out["files"].append(fname)
        names = history_feature_names(name, cfg.history.windows, cfg.history_actions, cfg.history.stats,
                                      TIME_UNIT_SUFFIX[cfg.time_unit])
        report["history_columns"][name] = names
        out["spec"].append(DenseFeature(name, dim=len(names)))
    return out


def _spec(cfg: DatasetConfig, main_sparse: dict[str, Any], main_nulls: dict[str, np.ndarray], side_infos: list[dict[str, Any]],
          spec_hist: list[DenseFeature], report: dict[str, Any]) -> tuple[FeatureSpec, list[str]]:
    """The feature spec in the config's order, the feature columns, the report's vocabulary,
    OOV, list and PCA entries."""
    vocab_sizes: dict[str, int] = {}
    oov: dict[str, dict[str, int]] = {}
    missing_oov: dict[str, dict[str, int]] = {}
    spec_sparse, spec_lists, spec_vectors = [], [], []
    for f in cfg.sparse:
        if f.name in main_sparse:
            vocab_sizes[f.name] = main_sparse[f.name][1].size
            null = main_nulls[f.name]
            if null.sum():
                missing_oov[f.name] = {s: int(null[k]) for k, s in enumerate(SPLITS)}
        else:
            info = next(i for i in side_infos if f.name in i["vocab_sizes"])
            vocab_sizes[f.name] = info["vocab_sizes"][f.name]
            oov[f.name] = info["oov"][f.name]
            if f.name in info["missing_oov"]:
                missing_oov[f.name] = info["missing_oov"][f.name]
        spec_sparse.append(SparseFeature(f.name, vocab_size=vocab_sizes[f.name], embedding_dim=f.embedding_dim))
    spec_dense = [DenseFeature(f.name) for f in cfg.dense] + spec_hist
    list_info, pca_info = {}, {}
    for f in cfg.lists:
        info = next(i for i in side_infos if f.name in i["lists"])
        vocab_sizes[f.name] = info["vocab_sizes"][f.name]
        oov[f.name] = info["oov"][f.name]
        list_info[f.name] = info["lists"][f.name]
        spec_lists.append(ListFeature(f.name, vocab_size=vocab_sizes[f.name], max_len=f.max_len,
                                      embedding_dim=f.embedding_dim, pooling=f.pooling, weighted=f.weighted))
    for f in cfg.vectors:
        info = next(i for i in side_infos if f.name in i.get("dims", {}))
        if f.name in info["pca"]:
            pca_info[f.name] = info["pca"][f.name]
        spec_vectors.append(VectorFeature(f.name, dim=info["dims"][f.name]))
    spec = FeatureSpec(sparse=spec_sparse, lists=spec_lists, dense=spec_dense, vectors=spec_vectors,
                       tasks=[lab.name for lab in cfg.labels], user_column="_user" if cfg.user else None)
    feature_cols = [f.name for f in spec_sparse]
    for f in spec_lists:
        feature_cols += [f.name] + ([f.name + WEIGHT_SUFFIX] if f.weighted else [])
    feature_cols += [f.name for f in spec_dense] + [f.name for f in spec_vectors]
    report.update({"vocab_sizes": vocab_sizes, "oov": oov, "missing_to_oov": missing_oov, "lists": list_info,
                   "pca": pca_info})
    return spec, feature_cols


def _write(cfg: DatasetConfig, ctx: RowsContext, refs: list[Any], fit: Fitted, tmp: Path,
           report: dict[str, Any]) -> list[dict[str, Any]]:
    """Assemble and write every block (Ray Data), check the counts, write the fitted row
    transformer; returns the tasks' results (rows, OOV and numeric_bins counts)."""
    import pickle

    import ray

    lab_names = [lab.name for lab in cfg.labels]
    meta = ["_row", *(["_user"] if cfg.user else []), *(["_item"] if cfg.item else []), *(["_day"] if cfg.time else [])]
    mask_names = [pp.MASK_PREFIX + n for n in lab_names] if cfg.negative_sampling is not None else []
    orders: dict[str, list[str]] = {}
    split_rows: dict[str, int] = {}
    for code, sname in enumerate(SPLITS):
        n_sel, n_lab = int(fit.kept_rows[code]), int(fit.kept_labelled[code])
        if n_sel and 0 < n_lab < n_sel:
            raise BadInput(f"split {sname} mixes labelled and unlabelled rows")
        orders[sname] = [*meta, *fit.feature_cols]
        if n_lab == n_sel:
            orders[sname] += lab_names + (mask_names if sname == "train" else [])
        split_rows[sname] = n_sel
        (tmp / sname).mkdir()
    main_inputs = [c for c in cfg.main.columns if c not in {lab.column for lab in cfg.labels}]
    transformer = RowTransformer(
        {c: cfg.main.columns[c] for c in main_inputs if not (cfg.time and c == cfg.time)},
        fit.main_sparse, fit.main_dense, fit.sides, [], fit.feature_cols, time=cfg.time, serve_day=fit.serve_day,
        user=cfg.user, item=cfg.item, unsupported=fit.unsupported,
    )
    transformer.save(tmp / "artifacts", history_files=fit.history_files)
    bins = [(f.name, f.dim) for f in fit.spec.dense] if cfg.numeric_bins is not None else []
    actx = AssembleContext(ctx, fit.main_sparse, fit.main_dense, fit.sides, fit.side_index, fit.history, orders, str(tmp),
                           bins)
    actx_ref = ray.put(actx)
    ds = ray.data.from_arrow_refs(refs).map_batches(
        _assemble_batch, batch_size=None, batch_format="pyarrow", num_cpus=1, fn_kwargs={"ctx": actx_ref})
    results = [r for r in (pickle.loads(x["result"]) for x in ds.take_all()) if r is not None]
    del actx_ref
    written = {s: sum(r["rows"][s] for r in results) for s in SPLITS}
    on_disk = {s: sum(pq.read_metadata(p).num_rows for p in (tmp / s).glob("*.parquet")) for s in SPLITS}
    if written != split_rows or on_disk != split_rows:
        raise RuntimeError(f"rows written {written} (on disk {on_disk}) != rows selected {split_rows}")
    oov = {}
    for name in report.pop("_oov_pending"):
        total = sum(r["oov"][name] for r in results)
        oov[name] = {s: int(total[k]) for k, s in enumerate(SPLITS)}
    report["oov"] = {f.name: (oov[f.name] if f.name in oov else report["oov"][f.name])
                     for f in [*cfg.sparse, *cfg.lists]}
    report["splits"] = split_rows
    report["labelled_splits"] = [s for k, s in enumerate(SPLITS) if split_rows[s] and fit.labelled_rows[k] == fit.rows[k]]
    return results


def _fit_bins(spec: FeatureSpec, results: list[dict[str, Any]], train_dir: Path, bins: int,
              artifacts: Path) -> FeatureSpec:
    """``numeric_bins``: the edges :func:`pipeline.transforms.buckets.fit_numeric_boundaries`
    fits on the written training rows, from the assembly tasks' bucket counts (first pass) and
    rounds of one task per group of training files collecting the values of the buckets the edges need
    (the plain quantiles' buckets first; a feature with mass points asks for a round more per
    step of :func:`~pipeline.transforms.buckets.tie_aware_edges`); the driver never holds the
    training values."""
    import ray

    dense = [(f.name, f.dim) for f in spec.dense]
    if not dense:
        return spec
    files = sorted(train_dir.glob("*.parquet"))
    counts = {name: sum(r["bins"][name] for r in results if name in r["bins"]) for name, _ in dense}
    if not files or any(isinstance(c, int) for c in counts.values()):
        raise ValueError(f"{train_dir}: no training rows to fit numeric_bins on")
    empty = (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    collected = {name: [empty] * dim for name, dim in dense}
    wanted = {name: first_wanted(counts[name], bins) for name, _ in dense}
    fitted: dict[str, QuantileBoundaries] = {}
    task = ray.remote(_bin_values)
    # a few groups of files per CPU: each task merges its group's values, so the driver holds a
    # few parts at a time, not one per file (at 4x full that was 0.75 GB more driver memory)
    groups = np.array_split(np.array([str(f) for f in files]), min(len(files), 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))))
    while wanted:
        asked = [(name, dim) for name, dim in dense if name in wanted]
        wanted_ref = ray.put(wanted)
        parts = ray.get([task.remote(list(g), asked, wanted_ref) for g in groups])
        for name, dim in asked:
            collected[name] = [merge_collected([collected[name][j], *[p[name][j] for p in parts]]) for j in range(dim)]
        wanted = {}
        for name, _ in asked:
            edges, missing = edges_from_parts(counts[name], collected[name], bins)
            if edges is None:
                wanted[name] = missing
            else:
                fitted[name] = QuantileBoundaries(bins, edges)
    return with_boundaries(spec, fitted, artifacts)


def _bin_values(paths: list[str], dense: list[tuple[str, int]], wanted: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """A second-pass round over a group of training files: per dense feature and component, the
    merged :func:`~pipeline.transforms.buckets.bucket_values` of the files."""
    per_file = []
    for path in paths:
        table = pq.read_table(path, columns=[name for name, _ in dense])
        per_file.append({name: bucket_values(feature_matrix(table[name], dim), wanted[name]) for name, dim in dense})
        del table
    return {name: [merge_collected([part[name][j] for part in per_file]) for j in range(dim)] for name, dim in dense}
