"""Declarative feature specification.

A :class:`FeatureSpec` says which columns a model reads and how: sparse ids, multi-hot id
lists, dense numbers and fixed-width pretrained vectors, plus the task (label) names. The
preprocessing stage writes one as JSON next to its Parquet output; :class:`mtl.inputs.InputModule`
reads it directly.

Batch convention (a ``dict[str, Tensor]``, see :class:`mtl.inputs.InputModule`):

- sparse ``name``: int64 ``[B]``; ids in ``[0, vocab_size)`` are in vocabulary, any other
  value (unseen id, negative id) is looked up in the out-of-vocabulary row ``vocab_size``.
- list ``name``: int64 ``[B, L]`` padded with :data:`PAD_ID` (``-1``); padding is ignored by
  pooling; other out-of-range ids go to the OOV row. Optional weights ``name + WEIGHT_SUFFIX``:
  float32 ``[B, L]``.
- dense ``name``: float32 ``[B]`` or ``[B, dim]``.
- vector ``name``: float32 ``[B, dim]``.

Example:
    >>> spec = FeatureSpec(
    ...     sparse=[SparseFeature("userid", vocab_size=20000)],
    ...     lists=[ListFeature("manual_tag_list", vocab_size=350, max_len=8)],
    ...     dense=[DenseFeature("videoplayseconds_log")],
    ...     vectors=[VectorFeature("feed_embedding_pca", dim=32)],
    ...     tasks=["read_comment", "like"],
    ... )
    >>> FeatureSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

PAD_ID = -1
WEIGHT_SUFFIX = "__weight"


@dataclass(frozen=True)
class SparseFeature:
    """A categorical id with ``vocab_size`` known values and one OOV bucket.

    Args:
        name: column name.
        vocab_size: number of in-vocabulary ids (``0 .. vocab_size-1``); the table has one
            extra row for out-of-vocabulary ids.
        embedding_dim: width of the embedding.
    """

    name: str
    vocab_size: int
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        _check_positive(self.name, vocab_size=self.vocab_size, embedding_dim=self.embedding_dim)


@dataclass(frozen=True)
class ListFeature:
    """A multi-hot list of ids, pooled to one vector.

    Args:
        name: column name.
        vocab_size: number of in-vocabulary ids; one extra OOV row.
        max_len: width of the padded ``[B, max_len]`` id tensor.
        embedding_dim: width of the embedding.
        pooling: ``"mean"`` (over non-padding entries; weighted mean with weights) or ``"sum"``.
        weighted: whether a per-id weight tensor ``name + WEIGHT_SUFFIX`` accompanies the ids
            (e.g. machine tag probabilities).
    """

    name: str
    vocab_size: int
    max_len: int
    embedding_dim: int = 16
    pooling: Literal["mean", "sum"] = "mean"
    weighted: bool = False

    def __post_init__(self) -> None:
        _check_positive(
            self.name, vocab_size=self.vocab_size, max_len=self.max_len, embedding_dim=self.embedding_dim
        )
        if self.pooling not in ("mean", "sum"):
            raise ValueError(f"list feature {self.name!r}: pooling must be 'mean' or 'sum', got {self.pooling!r}")


NUMERIC_ENCODINGS = ("bucket", "piecewise_linear", "periodic")


@dataclass(frozen=True)
class NumericEncoding:
    """How the model turns one number into a vector (Gorishniy, Rubachev, Babenko, "On
    Embeddings for Numerical Features in Tabular Deep Learning", NeurIPS 2022).

    Args:
        kind: ``"bucket"`` (the quantile bin's embedding row), ``"piecewise_linear"`` (PLE over
            the quantile bins, then a linear layer and ReLU) or ``"periodic"`` (``sin``/``cos`` of
            learned frequencies, then a linear layer and ReLU: PLR). The first two need the
            feature's ``boundaries`` (fitted on training rows by preprocessing).
        dim: output width per component.
        frequencies: periodic only: learned frequencies per component.
        sigma: periodic only: std of the frequencies' N(0, sigma^2) initialisation.
    """

    kind: str
    dim: int = 8
    frequencies: int = 16
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in NUMERIC_ENCODINGS:
            raise ValueError(f"numeric encoding {self.kind!r} unknown; choose from {NUMERIC_ENCODINGS}")
        _check_positive(f"encoding {self.kind}", dim=self.dim, frequencies=self.frequencies)
        if not self.sigma > 0:
            raise ValueError(f"numeric encoding: sigma must be > 0, got {self.sigma}")

    @property
    def needs_boundaries(self) -> bool:
        return self.kind != "periodic"


@dataclass(frozen=True)
class DenseFeature:
    """A real-valued feature of width ``dim`` (already scaled by preprocessing).

    Args:
        name: column name.
        dim: number of components.
        boundaries: per component, the quantile bin edges of the training rows' values
            (``dim`` lists of ``bins + 1`` non-decreasing numbers), written by preprocessing
            when the dataset config asks for ``numeric_bins``.
        encoding: how the model embeds each component; ``None`` = the number itself.
    """

    name: str
    dim: int = 1
    boundaries: list[list[float]] | None = None
    encoding: NumericEncoding | None = None

    def __post_init__(self) -> None:
        _check_positive(self.name, dim=self.dim)
        if isinstance(self.encoding, dict):
            object.__setattr__(self, "encoding", NumericEncoding(**self.encoding))
        if self.boundaries is not None:
            if len(self.boundaries) != self.dim or any(len(b) < 2 for b in self.boundaries):
                raise ValueError(f"feature {self.name!r}: boundaries must be {self.dim} lists of >= 2 edges")
            if any(b[i] > b[i + 1] for b in self.boundaries for i in range(len(b) - 1)):
                raise ValueError(f"feature {self.name!r}: boundaries must be non-decreasing")
        if self.encoding is not None and self.encoding.needs_boundaries and self.boundaries is None:
            raise ValueError(
                f"feature {self.name!r}: encoding {self.encoding.kind!r} needs quantile boundaries fitted on "
                f"training rows (set numeric_bins in the dataset config and preprocess again)"
            )

    @property
    def output_dim(self) -> int:
        """Width of this feature in the input representation."""
        return self.dim * (self.encoding.dim if self.encoding is not None else 1)


@dataclass(frozen=True)
class VectorFeature:
    """A fixed-width pretrained vector (e.g. the 512-d feed embedding or its PCA reduction)."""

    name: str
    dim: int

    def __post_init__(self) -> None:
        _check_positive(self.name, dim=self.dim)


@dataclass(frozen=True)
class FeatureSpec:
    """All inputs of a model plus its task names.

    Args:
        sparse: single-id features.
        lists: multi-hot id-list features.
        dense: real-valued features.
        vectors: pretrained fixed-width vectors.
        tasks: label column names, in the order of the model's logits.
        user_column: the column that groups rows per user for per-user AUC (optional; it may
            also be a sparse feature).
    """

    sparse: list[SparseFeature] = field(default_factory=list)
    lists: list[ListFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    vectors: list[VectorFeature] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    user_column: str | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.all_features()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature spec: duplicate feature names {dup}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"feature spec: duplicate task names in {self.tasks}")

    def all_features(self) -> list[SparseFeature | ListFeature | DenseFeature | VectorFeature]:
        return [*self.sparse, *self.lists, *self.dense, *self.vectors]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def input_dim(self) -> int:
        """Width of the concatenated representation produced by the input module."""
        return (
            sum(f.embedding_dim for f in self.sparse)
            + sum(f.embedding_dim for f in self.lists)
            + sum(f.output_dim for f in self.dense)
            + sum(f.dim for f in self.vectors)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        unknown = set(data) - {"sparse", "lists", "dense", "vectors", "tasks", "user_column"}
        if unknown:
            raise ValueError(f"feature spec: unknown keys {sorted(unknown)}")
        return cls(
            sparse=[SparseFeature(**f) for f in data.get("sparse", [])],
            lists=[ListFeature(**f) for f in data.get("lists", [])],
            dense=[DenseFeature(**f) for f in data.get("dense", [])],
            vectors=[VectorFeature(**f) for f in data.get("vectors", [])],
            tasks=list(data.get("tasks", [])),
            user_column=data.get("user_column"),
        )

    def with_numeric_encodings(self, encodings: dict[str, NumericEncoding | None]) -> "FeatureSpec":
        """This spec with dense features' encodings set by name; the key ``"*"`` applies to
        every dense feature not named (``None`` = the raw number).

        Raises:
            ValueError: a name that is no dense feature, or an encoding that needs boundaries the
                feature lacks.
        """
        names = {f.name for f in self.dense}
        unknown = sorted(set(encodings) - names - {"*"})
        if unknown:
            raise ValueError(f"numeric encodings for {unknown}: no such dense feature (dense: {sorted(names)})")
        default = encodings.get("*")
        dense = [replace(f, encoding=encodings.get(f.name, default)) for f in self.dense]
        return replace(self, dense=dense)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid feature spec: {exc}") from exc


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"feature {name!r}: {key} must be a positive int, got {value!r}")
