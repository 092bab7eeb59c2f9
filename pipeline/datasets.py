"""Dataset configs: which files a raw log has and what role each column plays.

One pydantic model, :class:`DatasetConfig`, loaded from ``configs/datasets/*.yaml`` by
:func:`pipeline.config.load_config`, drives :mod:`pipeline.preprocess` for any interaction log
or plain table: the main file (one row per example), side tables joined on a key (e.g. WeChat's
``feed_info.csv`` on ``feedid``), extra unlabelled rows (``test_a.csv``), then column roles —
labels, sparse ids, dense numbers, id lists, pretrained vectors — plus history windows,
de-duplication, the split rule and negative down-sampling.

Example:
    >>> cfg = DatasetConfig.model_validate({
    ...     "name": "toy",
    ...     "main": {"path": "t.csv", "columns": {"u": "int", "y": "int"}},
    ...     "labels": [{"name": "y"}],
    ...     "sparse": [{"name": "u"}],
    ...     "split": {"kind": "random", "valid_fraction": 0.2, "test_fraction": 0.0},
    ... })
    >>> cfg.labels[0].column
    'y'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ColumnType = Literal["int", "float", "str"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileConfig(_Strict):
    """A source file under ``--raw``.

    Args:
        path: path relative to the raw directory (``.csv`` or ``.parquet``).
        columns: the columns read and their expected types; every listed column must exist.
            Other columns of the file are ignored (never read).
        nullable: columns that may be empty; anything else empty/NaN is an error.
    """

    path: str
    columns: dict[str, ColumnType]
    nullable: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "FileConfig":
        unknown = sorted(set(self.nullable) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: nullable columns {unknown} are not in columns")
        return self


class SideTableConfig(FileConfig):
    """A table joined to the main rows on ``key`` (one row per key value).

    Args:
        key: the key column; it must exist in the main rows and be unique here.
        on_missing: a main row whose key is absent here: ``error`` (default) or ``null``
            (its side columns become missing; counted in the report).
    """

    key: str
    on_missing: Literal["error", "null"] = "error"


class ExtraRowsConfig(FileConfig):
    """Unlabelled rows appended to the main rows (e.g. WeChat ``test_a.csv`` = day 15).

    Args:
        assign: constant values for columns the file lacks (e.g. ``{date_: 15}``).
    """

    assign: dict[str, Any] = Field(default_factory=dict)


class LabelConfig(_Strict):
    """A task label.

    Without ``positive`` the column must hold only 0 and 1. With ``positive`` the label is 1
    for those values and 0 for the ``negative`` values; any other value (UCI's test file writes
    ``>50K.``) is an error naming file, column and row, unless ``unlisted: negative`` asks to
    take every other value as 0, counted under ``repairs`` in ``report.json``.
    """

    name: str
    column: str | None = None
    positive: list[Any] | None = None
    negative: list[Any] | None = None
    unlisted: Literal["error", "negative"] = "error"

    @model_validator(mode="after")
    def _default_column(self) -> "LabelConfig":
        if self.column is None:
            self.column = self.name
        if self.positive is None:
            if self.negative is not None or self.unlisted != "error":
                raise ValueError(f"label {self.name}: negative/unlisted need positive values")
            return self
        if not self.positive:
            raise ValueError(f"label {self.name}: positive is empty")
        if self.negative is None and self.unlisted == "error":
            raise ValueError(
                f"label {self.name}: with positive, list the negative values too (negative: [...]), "
                "or set unlisted: negative to take every other value as 0 (counted in the report)"
            )
        both = [v for v in self.positive if v in (self.negative or [])]
        if both:
            raise ValueError(f"label {self.name}: values {both} are both positive and negative")
        return self


class SparseConfig(_Strict):
    """A categorical id: vocabulary = values seen in training rows; others -> OOV (``V``)."""

    name: str
    column: str | None = None
    embedding_dim: int = 16

    @model_validator(mode="after")
    def _default_column(self) -> "SparseConfig":
        if self.column is None:
            self.column = self.name
        return self


class DenseConfig(_Strict):
    """A number. ``transform``: ``none``, ``log1p`` (values must be >= 0), ``standard``
    (z-score with training mean/std) or ``log1p_standard``."""

    name: str
    column: str | None = None
    transform: Literal["none", "log1p", "standard", "log1p_standard"] = "none"

    @model_validator(mode="after")
    def _default_column(self) -> "DenseConfig":
        if self.column is None:
            self.column = self.name
        return self


class ListConfig(_Strict):
    """A multi-hot id list stored as a string, e.g. ``"12;7;33"``.

    Args:
        sep: separator between entries.
        weighted: entries are ``"id<pair_sep>weight"`` pairs (e.g. machine tags with their
            probability); the weights become the ``<name>__weight`` column.
        max_len: kept entries (longer lists are truncated, counted in the report).
    """

    name: str
    column: str | None = None
    sep: str = ";"
    weighted: bool = False
    pair_sep: str = " "
    max_len: int = 8
    embedding_dim: int = 16
    pooling: Literal["mean", "sum"] = "mean"

    @model_validator(mode="after")
    def _default_column(self) -> "ListConfig":
        if self.column is None:
            self.column = self.name
        return self


class VectorConfig(_Strict):
    """A fixed-width vector stored as a ``sep``-joined string of ``width`` floats.

    Args:
        width: the expected number of floats in the source (e.g. 512).
        pca_dim: reduce to this many dimensions by PCA fitted on the rows of training
            items only (None: keep all ``width``).
    """

    name: str
    column: str | None = None
    sep: str = " "
    width: int
    pca_dim: int | None = None

    @model_validator(mode="after")
    def _default_column(self) -> "VectorConfig":
        if self.column is None:
            self.column = self.name
        return self


class HistoryConfig(_Strict):
    """Per-key action statistics over the ``w`` days strictly before a row's day.

    For every key group (e.g. ``[userid]``, ``[userid, authorid]``) one dense feature
    ``hist_<keys>`` of width ``len(windows) * (1 + len(stats) * len(actions))``: per window
    ``w``, log1p(impressions in days d-w..d-1), then per stat and action either
    ``count`` = log1p(positives) or ``rate`` = positives / impressions (0 when none).
    """

    keys: list[list[str]]
    # a window w covers days d-w..d-1: w <= 0 would reach into the row's own day (a label leak)
    # or beyond (NaN/-inf features), so every window is a whole number of days >= 1
    windows: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 3, 7], min_length=1)
    stats: list[Literal["count", "rate"]] = Field(default_factory=lambda: ["count", "rate"])
    actions: list[str] | None = None  # label names; default: all labels

    @field_validator("windows")
    @classmethod
    def _distinct(cls, windows: list[int]) -> list[int]:
        if len(set(windows)) != len(windows):
            raise ValueError(f"windows {windows} repeat a window (its feature columns would clash)")
        return windows


class DedupConfig(_Strict):
    """Duplicate main rows on ``keys``: keep the ``last`` or ``first`` in file order, or keep
    ``all``. The count of duplicates is always reported."""

    keys: list[str]
    keep: Literal["last", "first", "all"] = "last"


class SplitConfig(_Strict):
    """``day``: rows by the ``time`` column into inclusive day ranges (train, valid, test;
    rows in none of them feed history features only, counted). ``random``: a seeded
    fraction of rows to valid and test."""

    kind: Literal["day", "random"]
    train_days: tuple[int, int] | None = None
    valid_days: tuple[int, int] | None = None
    test_days: tuple[int, int] | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.kind == "day" and self.train_days is None:
            raise ValueError("split.kind=day needs train_days")
        if self.kind == "random" and not (0 <= self.valid_fraction + self.test_fraction < 1):
            raise ValueError("split: valid_fraction + test_fraction must be in [0, 1)")
        return self


class NegativeSamplingConfig(_Strict):
    """Per-action negative down-sampling of training rows: for action ``a`` a negative row is
    kept with probability ``rates[a]``; a row is written if it is kept for any action and
    ``_mask__<task>`` columns say for which (missing actions: rate 1). Seeded by ``seed``
    and the source row number, so it does not depend on batching."""

    rates: dict[str, float]
    seed: int = 0


class DatasetConfig(_Strict):
    """A raw dataset: files and column roles.

    Args:
        name: dataset name (recorded in the report).
        main: the file with one row per example (impression).
        side_tables: tables joined on a key column of the main rows.
        extra_rows: unlabelled rows appended (test impressions).
        user: raw user id column (kept as ``_user`` for per-user metrics), optional.
        item: raw item id column (kept as ``_item``), optional.
        time: day column (integer days), needed by ``split.kind=day`` and history.
        labels, sparse, dense, lists, vectors: column roles.
        drop: columns that must not be used as features (checked), e.g. label leaks.
    """

    name: str
    attribution: str | None = None
    main: FileConfig
    side_tables: list[SideTableConfig] = Field(default_factory=list)
    extra_rows: list[ExtraRowsConfig] = Field(default_factory=list)
    user: str | None = None
    item: str | None = None
    time: str | None = None
    labels: list[LabelConfig]
    sparse: list[SparseConfig] = Field(default_factory=list)
    dense: list[DenseConfig] = Field(default_factory=list)
    lists: list[ListConfig] = Field(default_factory=list)
    vectors: list[VectorConfig] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)
    history: HistoryConfig | None = None
    dedup: DedupConfig | None = None
    split: SplitConfig
    negative_sampling: NegativeSamplingConfig | None = None
    rows_per_block: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _check_roles(self) -> "DatasetConfig":
        available: dict[str, str] = {c: self.main.path for c in self.main.columns}
        for side in self.side_tables:
            if side.key not in self.main.columns:
                raise ValueError(f"side table {side.path}: key {side.key!r} is not a column of {self.main.path}")
            for c in side.columns:
                if c != side.key:
                    available.setdefault(c, side.path)
        features = [*self.sparse, *self.dense, *self.lists, *self.vectors]
        used = [f.column for f in features] + [lab.column for lab in self.labels]
        for col in used:
            if col not in available:
                raise ValueError(f"column {col!r} is used but not listed in any file's columns")
        leaked = sorted({f.column for f in features} & set(self.drop))
        if leaked:
            raise ValueError(f"columns {leaked} are in drop but used as features")
        label_cols = {lab.column for lab in self.labels}
        as_feature = sorted({f.column for f in features} & label_cols)
        if as_feature:
            raise ValueError(f"label columns {as_feature} are also used as features")
        names = [f.name for f in features] + [lab.name for lab in self.labels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate feature/label names {dup}")
        if self.split.kind == "day" and self.time is None:
            raise ValueError("split.kind=day needs the time column (time:)")
        if self.history is not None:
            if self.time is None:
                raise ValueError("history features need the time column (time:)")
            for group in self.history.keys:
                for key in group:
                    if key not in available:
                        raise ValueError(f"history key {key!r} is not a column of any file")
            unknown = sorted(set(self.history.actions or []) - {lab.name for lab in self.labels})
            if unknown:
                raise ValueError(f"history actions {unknown} are not label names")
        if self.negative_sampling is not None:
            unknown = sorted(set(self.negative_sampling.rates) - {lab.name for lab in self.labels})
            if unknown:
                raise ValueError(f"negative_sampling rates for unknown labels {unknown}")
        for f in self.vectors:
            if f.pca_dim is not None and not 0 < f.pca_dim <= f.width:
                raise ValueError(f"vector {f.name}: pca_dim must be in 1..{f.width}")
        return self

    @property
    def history_actions(self) -> list[str]:
        if self.history is None:
            return []
        return list(self.history.actions or [lab.name for lab in self.labels])
