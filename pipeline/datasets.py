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
TimeUnit = Literal["days", "seconds"]
#: the suffix of a history window in feature names: ``hist_userid_7d_n``, ``hist_userId_86400s_n``
TIME_UNIT_SUFFIX: dict[str, str] = {"days": "d", "seconds": "s"}


class _Strict(BaseModel):
    # a string literal under a field is its description: docs/dataset_config.md is generated
    # from these (scripts/dataset_config_doc.py), and a test fails on a field without one
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FileConfig(_Strict):
    """A source file under ``--raw`` (``.csv`` with a header line, or ``.parquet``)."""

    path: str
    """Path relative to the raw directory (``.csv`` or ``.parquet``)."""
    columns: dict[str, ColumnType]
    """The columns read and their types (``int``, ``float``, ``str``); every listed column must
    exist. Other columns of the file are ignored (never read)."""
    nullable: list[str] = Field(default_factory=list)
    """Columns that may be empty; anything else empty/NaN is an error naming file, column and row."""

    @model_validator(mode="after")
    def _check(self) -> "FileConfig":
        unknown = sorted(set(self.nullable) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: nullable columns {unknown} are not in columns")
        return self


class SideTableConfig(FileConfig):
    """A table joined to the main rows on ``key`` (one row per key value), e.g. item metadata."""

    key: str
    """The key column; it must exist in the main rows and be unique here."""
    on_missing: Literal["error", "null"] = "error"
    """A main row whose key is absent here: ``error``, or ``null`` (its side columns become
    missing: OOV / 0 / empty list; counted under ``repairs`` in ``report.json``)."""


class ExtraRowsConfig(FileConfig):
    """Unlabelled rows appended to the main rows (e.g. WeChat ``test_a.csv`` = day 15)."""

    assign: dict[str, Any] = Field(default_factory=dict)
    """Constant values for main columns the file lacks (e.g. ``{date_: 15}``)."""


class LabelConfig(_Strict):
    """A task label, 0/1 per main row.

    Without ``positive`` the column must hold only 0 and 1. With ``positive`` the label is 1
    for those values and 0 for the ``negative`` values; any other value (UCI's test file writes
    ``>50K.``) is an error naming file, column and row, unless ``unlisted: negative`` asks to
    take every other value as 0, counted under ``repairs`` in ``report.json``.
    """

    name: str
    """The task name (the label column in the output, the model's task)."""
    column: str | None = None
    """The source column (default: ``name``)."""
    positive: list[Any] | None = None
    """Values that make the label 1 (of the column's type: ``[4.0, 4.5, 5.0]`` for a float rating)."""
    negative: list[Any] | None = None
    """Values that make the label 0; required with ``positive`` unless ``unlisted: negative``."""
    unlisted: Literal["error", "negative"] = "error"
    """A value in neither list: ``error``, or ``negative`` (taken as 0, counted in the report)."""

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
    """A categorical id (int or str): vocabulary = values seen in training rows; any other
    value, and an empty one, -> the OOV id ``V`` (counted per split in the report)."""

    name: str
    """The feature name."""
    column: str | None = None
    """The source column, in the main file or a side table (default: ``name``)."""
    embedding_dim: int = 16
    """Width of the feature's embedding."""

    @model_validator(mode="after")
    def _default_column(self) -> "SparseConfig":
        if self.column is None:
            self.column = self.name
        return self


class DenseConfig(_Strict):
    """A number, scaled with statistics of the training rows (an empty value -> 0 before
    scaling, counted under ``repairs``)."""

    name: str
    """The feature name."""
    column: str | None = None
    """The source column (default: ``name``)."""
    transform: Literal["none", "log1p", "standard", "log1p_standard"] = "none"
    """``none``, ``log1p`` (values must be >= 0), ``standard`` (z-score with the training
    mean/std) or ``log1p_standard``."""

    @model_validator(mode="after")
    def _default_column(self) -> "DenseConfig":
        if self.column is None:
            self.column = self.name
        return self


class ListConfig(_Strict):
    """A multi-hot list stored as one string, e.g. ``"12;7;33"`` or ``"Comedy|Romance"``: the
    entries are mapped by a vocabulary of the training rows' entries (unseen -> OOV ``V``)."""

    name: str
    """The feature name."""
    column: str | None = None
    """The source column (default: ``name``); an empty value is an empty list."""
    sep: str = ";"
    """Separator between entries (a literal string, not a pattern)."""
    tokens: Literal["int", "str"] = "int"
    """Entry type: ``int`` (every entry must be an integer id; anything else is an error naming
    file, column and row) or ``str`` (any non-empty token, e.g. genre names)."""
    weighted: bool = False
    """Entries are ``"id<pair_sep>weight"`` pairs (e.g. machine tags with their probability);
    the weights become the ``<name>__weight`` column."""
    pair_sep: str = " "
    """Separator between id and weight of a weighted entry."""
    max_len: int = 8
    """Entries kept per row (longer lists are truncated before the vocabulary is fitted,
    counted in the report)."""
    embedding_dim: int = 16
    """Width of the entries' embedding."""
    pooling: Literal["mean", "sum"] = "mean"
    """How a row's entry embeddings are pooled."""

    @model_validator(mode="after")
    def _default_column(self) -> "ListConfig":
        if self.column is None:
            self.column = self.name
        return self


class VectorConfig(_Strict):
    """A fixed-width vector stored as a ``sep``-joined string of ``width`` floats."""

    name: str
    """The feature name."""
    column: str | None = None
    """The source column (default: ``name``)."""
    sep: str = " "
    """Separator between the floats (``" "``: any run of white space)."""
    width: int
    """The expected number of floats in the source (e.g. 512); another count is an error."""
    pca_dim: int | None = None
    """Reduce to this many dimensions by PCA fitted on the rows of training items only
    (None: keep all ``width``)."""

    @model_validator(mode="after")
    def _default_column(self) -> "VectorConfig":
        if self.column is None:
            self.column = self.name
        return self


class HistoryConfig(_Strict):
    """Per-key action statistics over a window of time strictly before a row's time.

    For every key group (e.g. ``[userid]``, ``[userid, authorid]``) one dense feature
    ``hist_<keys>`` of width ``len(windows) * (1 + len(stats) * len(actions))``: per window
    ``w``, log1p(impressions at times t-w..t-1), then per stat and action either
    ``count`` = log1p(positives) or ``rate`` = positives / impressions (0 when none). Rows at
    the row's own time (the same day, or the same second) never count.
    """

    keys: list[list[str]]
    """Key groups; each key a column of the main file or a side table."""
    # a window w covers times t-w..t-1: w <= 0 would reach into the row's own time (a label
    # leak) or beyond (NaN/-inf features), so every window is a whole number >= 1
    windows: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 3, 7], min_length=1)
    """Window lengths in the time column's units (``time_unit``: days, or seconds: 86400 is
    one day); feature names carry the unit (``hist_userid_7d_n``, ``hist_userId_86400s_n``)."""
    stats: list[Literal["count", "rate"]] = Field(default_factory=lambda: ["count", "rate"])
    """Per action: ``count`` (log1p of positives) and/or ``rate`` (positives / impressions)."""
    actions: list[str] | None = None
    """Label names counted (default: all labels)."""
    protocol: Literal["online", "train_only"] = "online"
    """Which labelled rows feed history: ``online`` — every labelled row, whatever its split,
    feeds the features of later rows (as a deployed system that sees each outcome as it
    happens: validation/test rows read earlier validation labels); ``train_only`` — rows of the
    valid and test splits never feed history (training rows and rows outside every split do),
    so no evaluation label reaches any feature. Recorded in ``report.json`` (``history``)."""

    @field_validator("windows")
    @classmethod
    def _distinct(cls, windows: list[int]) -> list[int]:
        if len(set(windows)) != len(windows):
            raise ValueError(f"windows {windows} repeat a window (its feature columns would clash)")
        return windows


class DedupConfig(_Strict):
    """Duplicate main rows (equal on ``keys``); the count of duplicates is always reported."""

    keys: list[str]
    """Main columns whose equal values make rows duplicates."""
    keep: Literal["last", "first", "all"] = "last"
    """Keep the ``last`` or ``first`` in file order (the others are dropped, counted), or ``all``."""


class SplitConfig(_Strict):
    """Which rows are train, valid and test.

    ``day``: rows by the ``time`` column into inclusive ranges (train, valid, test; in the
    time column's units; rows in none of them feed history features only, counted).
    ``random``: a seeded fraction of rows to valid and test. ``ordered``: by time — the last
    ``test_fraction`` of labelled rows to test, the ``valid_fraction`` before them to valid;
    rows sharing a time stay on one side (the later one), so the fractions are met as closely
    as ties allow and the boundary times are reported (``split_boundaries``). Unlabelled
    (extra) rows go to test under ``random`` and ``ordered``.
    """

    kind: Literal["day", "random", "ordered"]
    """``day`` (time ranges), ``random`` (seeded fractions) or ``ordered`` (fractions of time)."""
    train_days: tuple[int, int] | None = None
    """``day``: inclusive ``[first, last]`` time of training rows (needed)."""
    valid_days: tuple[int, int] | None = None
    """``day``: inclusive time range of validation rows (None: no valid split)."""
    test_days: tuple[int, int] | None = None
    """``day``: inclusive time range of test rows (None: no test split)."""
    valid_fraction: float = 0.1
    """``random``/``ordered``: the fraction of labelled rows for validation."""
    test_fraction: float = 0.1
    """``random``/``ordered``: the fraction of labelled rows for test."""
    seed: int = 0
    """``random``: the seed of the row draw."""

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.kind == "day" and self.train_days is None:
            raise ValueError("split.kind=day needs train_days")
        if self.kind != "day" and not (
            self.valid_fraction >= 0 and self.test_fraction >= 0 and self.valid_fraction + self.test_fraction < 1
        ):
            raise ValueError(f"split: valid_fraction and test_fraction must be >= 0 with a sum below 1 (kind={self.kind})")
        return self


class NegativeSamplingConfig(_Strict):
    """Per-action negative down-sampling of training rows: for action ``a`` a negative row is
    kept with probability ``rates[a]``; a row is written if it is kept for any action and
    ``_mask__<task>`` columns say for which. Seeded by ``seed`` and the source row number, so
    it does not depend on batching."""

    rates: dict[str, float]
    """Label name -> keep probability of its negatives (labels not listed: 1)."""
    seed: int = 0
    """The seed of the draw."""


class DatasetConfig(_Strict):
    """A raw dataset: its files and the role each column plays (the top level of a
    ``configs/datasets/*.yaml`` file)."""

    name: str
    """Dataset name (recorded in the report)."""
    attribution: str | None = None
    """Citation and licence of the data (recorded in the report)."""
    main: FileConfig
    """The file with one row per example (an impression, a rating)."""
    side_tables: list[SideTableConfig] = Field(default_factory=list)
    """Tables joined on a key column of the main rows (item or user metadata)."""
    extra_rows: list[ExtraRowsConfig] = Field(default_factory=list)
    """Unlabelled rows appended to the main rows (test impressions)."""
    user: str | None = None
    """Raw user id column, kept as ``_user`` (per-user metrics such as uAUC); optional."""
    item: str | None = None
    """Raw item id column, kept as ``_item``; optional."""
    time: str | None = None
    """Time column (integers >= 0, in ``time_unit``), kept as ``_day``; needed by
    ``split.kind`` ``day`` and ``ordered`` and by history features."""
    time_unit: TimeUnit = "days"
    """Unit of the time column: ``days`` (day numbers, as WeChat's ``date_``) or ``seconds``
    (e.g. Unix timestamps). History windows and ``split.*_days`` ranges are in this unit."""
    labels: list[LabelConfig]
    """The tasks (at least one)."""
    sparse: list[SparseConfig] = Field(default_factory=list)
    """Categorical id features."""
    dense: list[DenseConfig] = Field(default_factory=list)
    """Numeric features."""
    numeric_bins: int | None = Field(None, ge=1)
    """Quantile bins fitted per dense feature component (history counts and rates included) on
    the training rows' scaled values, tie-aware (a value held by many rows takes one edge and
    leaves its bins to the other values), saved as ``artifacts/bins_<name>.json`` and written into
    the feature spec as ``boundaries``: what a train config's ``numeric`` encodings
    ``bucket`` / ``piecewise_linear`` read (None: no boundaries)."""
    lists: list[ListConfig] = Field(default_factory=list)
    """Multi-hot list features (ids or string tokens in one string column)."""
    vectors: list[VectorConfig] = Field(default_factory=list)
    """Fixed-width float vector features (optionally PCA-reduced)."""
    drop: list[str] = Field(default_factory=list)
    """Columns that must not be used as features (checked), e.g. label leaks."""
    history: HistoryConfig | None = None
    """Per-key history features from strictly earlier rows (None: none)."""
    dedup: DedupConfig | None = None
    """De-duplication of the main rows (None: rows kept as they are)."""
    split: SplitConfig
    """The train/valid/test rule."""
    negative_sampling: NegativeSamplingConfig | None = None
    """Per-action negative down-sampling of training rows (None: none)."""
    rows_per_block: int = Field(200_000, ge=1)
    """Rows per Ray Data block (and per output Parquet file); a performance knob only."""

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
        if self.split.kind in ("day", "ordered") and self.time is None:
            raise ValueError(f"split.kind={self.split.kind} needs the time column (time:)")
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
