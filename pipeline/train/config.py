"""The training configs: :class:`TrainConfig` (the model, strategy and optimisation of one run,
shared by the local loop, every Ray worker, the benches and Tune trials) and
:class:`TrainJobConfig` (a ``python -m pipeline train`` job: the run plus its workers, storage,
checkpoints and MLflow). Everything is checked here, before any worker starts.

Example:
    >>> cfg = TrainConfig(model={"name": "ple", "params": {"num_levels": 2}}, strategy={"name": "pcgrad"})
    >>> cfg.sync
    'local'
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtl.distributed import SYNC_MODES
from mtl.features import FeatureSpec, NumericEncoding
from mtl.models import MODELS
from mtl.precision import DEFAULT_PRECISION, check_precision
from mtl.strategies import STRATEGIES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Registered(Strict):
    """A name from a registry and the keyword arguments of what it names (both checked here)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    _kind: ClassVar[str]
    _skip: ClassVar[set[str]]
    _registry: ClassVar[dict[str, Any]]

    @model_validator(mode="after")
    def _known(self) -> "_Registered":
        registry = self._registry
        if self.name not in registry:
            raise ValueError(f"{self._kind}.name {self.name!r} unknown; registered: {sorted(registry)}")
        if "compute_dtype" in self.params:
            raise ValueError("set the body's precision with train.precision, not model.params.compute_dtype")
        _check_kwargs(registry[self.name], self.params, f"{self._kind}.params of {self.name!r}", skip=self._skip)
        return self


class ModelConfig(_Registered):
    """An architecture from :data:`mtl.models.MODELS` and its keyword arguments."""

    name: str = "mmoe"
    _kind: ClassVar[str] = "model"
    _skip: ClassVar[set[str]] = {"spec", "sparse_gradients"}
    _registry: ClassVar[dict[str, Any]] = MODELS


class StrategyConfig(_Registered):
    """A strategy from :data:`mtl.strategies.STRATEGIES` and its keyword arguments."""

    name: str = "equal"
    _kind: ClassVar[str] = "strategy"
    _skip: ClassVar[set[str]] = {"num_tasks"}
    _registry: ClassVar[dict[str, Any]] = STRATEGIES


class OptimizerConfig(Strict):
    """The library's optimizer (:func:`mtl.optim.build_optimizer`) and gradient clipping."""

    lr: float = Field(1e-3, gt=0)
    #: learning rate of the input module (id tables and numeric embeddings); None = lr
    embedding_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    #: L2 on the input module's parameters, applied to the id-table rows a batch touches (so a
    #: row is regularised in proportion to how often it occurs: mtl.optim.MixedAdam)
    embedding_weight_decay: float = Field(0.0, ge=0)
    #: clip the global gradient norm (all parameters, embeddings included, after the ranks'
    #: gradients are averaged, so identical on every rank); None = no clipping
    clip_grad_norm: float | None = Field(None, gt=0)


class NumericEncodingConfig(Strict):
    """How the model embeds a dense feature (:class:`mtl.features.NumericEncoding`)."""

    kind: Literal["raw", "bucket", "piecewise_linear", "periodic"]
    dim: int = Field(8, ge=1)
    frequencies: int = Field(16, ge=1)
    sigma: float = Field(1.0, gt=0)

    def encoding(self) -> NumericEncoding | None:
        if self.kind == "raw":
            return None
        return NumericEncoding(self.kind, dim=self.dim, frequencies=self.frequencies, sigma=self.sigma)


class ValidHoldoutConfig(Strict):
    """Which validation rows are held out for the report (``train.valid_holdout``; what is done
    with them: :mod:`pipeline.train.holdout`).

    Args:
        key: the meta column hashed: ``_user`` (every user's rows on one side) or ``_row``.
        report_fraction: the share of keys held out for the report; training selects on the rest.
        salt: another salt draws another split of the keys.
    """

    key: Literal["_user", "_row"] = "_user"
    report_fraction: float = Field(0.5, gt=0, lt=1)
    salt: int = Field(0, ge=0)


class LrPlateauConfig(Strict):
    """Multiply every learning rate by ``factor`` each time ``patience`` evaluations in a row
    have not improved the early-stopping metric (``train.lr_plateau``; "reduce on plateau").

    Args:
        factor: the multiplier (e.g. 0.5 halves the learning rates).
        patience: evaluations without improvement before each cut (< early stopping's patience,
            so the run trains on at the lower rate before it stops).
        min_lr: no learning rate is cut below this.
    """

    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(1, ge=1)
    min_lr: float = Field(0.0, ge=0)


class EarlyStoppingConfig(Strict):
    """Stop when the validation score has not improved for ``patience`` evaluations."""

    metric: str = "valid/score"
    patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0)


class WeightAverageConfig(Strict):
    """A running average of the parameters (:class:`mtl.averaging.WeightAverage`) that is
    evaluated, early-stopped on, restored as the best weights and saved in place of the last
    weights (``train.weight_average``). Costs a copy of the model (embedding tables included)
    and one pass over all its parameters per step.

    Args:
        kind: ``ema`` (``avg <- decay * avg + (1 - decay) * p`` after each step) or ``swa``
            (the plain mean of the parameters after each step).
        decay: the EMA's decay per optimizer step (its window is about ``1 / (1 - decay)`` steps).
        start_step: average only the steps after this one (evaluations before read the live weights).
    """

    kind: Literal["ema", "swa"] = "ema"
    decay: float = Field(0.999, gt=0, lt=1)
    start_step: int = Field(0, ge=0)


class TrainConfig(Strict):
    """Everything a training run depends on besides the data (logged with the run)."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    #: body precision (mtl.precision): "auto" = bfloat16 mixed precision where the device has
    #: native bfloat16 matrix units (AVX512-BF16/AMX CPUs, CUDA sm80+), float32 elsewhere;
    #: "float32" for exact float32 arithmetic. Parameters, optimizer state and logits stay float32.
    precision: str = DEFAULT_PRECISION
    #: where the ranks' per-task gradients meet (mtl.distributed): "local" (combine per rank,
    #: then one all-reduce), "global" (all-reduce the [K, P] task gradients first: equals one
    #: process on the union batch), "gram" (all-reduce the K x K Gram matrices)
    sync: Literal["local", "global", "gram"] = "local"
    batch_size: int = Field(4096, ge=1)  # per worker
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(32768, ge=1)
    #: intra-op threads per worker; None = the CPUs the worker was given (Ray) or all cores (local)
    torch_threads: int | None = Field(None, ge=1)
    log_every: int = Field(20, ge=1)
    #: also evaluate (and checkpoint) every this many steps within an epoch; None = per epoch only
    eval_every_steps: int | None = Field(None, ge=1)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    #: numeric features as embeddings, by dense feature name ("*": every other dense feature);
    #: bucket / piecewise_linear need the dataset's numeric_bins (issue 14)
    numeric: dict[str, NumericEncodingConfig] = Field(default_factory=dict)
    #: evaluate (early stopping, best weights) on a hashed part of the validation rows only and
    #: hold the rest out for the report (pipeline.train.holdout); None = select on every row
    valid_holdout: ValidHoldoutConfig | None = None
    #: evaluate and keep a running average of the weights instead of the last ones; None = off
    weight_average: WeightAverageConfig | None = None
    #: cut the learning rates when the early-stopping metric stalls; None = constant rates
    lr_plateau: LrPlateauConfig | None = None

    def model_spec(self, spec: FeatureSpec) -> FeatureSpec:
        """The data's spec with this run's numeric encodings (what the model is built from and
        saved with)."""
        if not self.numeric:
            return spec
        return spec.with_numeric_encodings({name: c.encoding() for name, c in self.numeric.items()})

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        check_precision(self.precision)
        assert self.sync in SYNC_MODES
        return self


class ScalingSection(Strict):
    """Ray Train workers: ``num_workers`` data-parallel ranks; GPUs when the cluster has them."""

    num_workers: int = Field(2, ge=1)
    #: "auto": one GPU per worker when the cluster has GPUs, CPU workers otherwise
    use_gpu: bool | Literal["auto"] = "auto"
    #: CPUs reserved per worker; "auto": the cluster's CPUs less one for Ray Data's readers,
    #: split over the workers, at least 0.5 (a whole CPU per worker on a 2-core machine starves
    #: the readers: shared/docs/stack_notes.md). Torch threads default to this, rounded down.
    cpus_per_worker: float | Literal["auto"] = "auto"
    #: Ray placement of the workers: "PACK" (fill a node first) or "SPREAD" (one per node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _positive(self) -> "ScalingSection":
        if self.cpus_per_worker != "auto" and self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be positive or 'auto', got {self.cpus_per_worker}")
        return self


class MlflowSection(Strict):
    #: default: sqlite:///<storage>/mlflow.db (rank 0 must reach it: on a multi-node cluster use
    #: a tracking server, http://..., or a shared file system)
    tracking_uri: str | None = None
    experiment: str = "mtlrank-train"
    run_name: str | None = None
    log_model: bool = True


class CheckpointSection(Strict):
    #: also checkpoint every this many steps (besides every epoch and every evaluation)
    every_steps: int | None = Field(None, ge=1)
    num_to_keep: int | None = Field(2, ge=1)


class DataSection(Strict):
    train_split: str = "train"
    valid_split: str = "valid"


class NanLabelAt(Strict):
    rank: int = Field(ge=0)
    step: int = Field(ge=1)
    task: str


class FaultSection(Strict):
    #: restarts of the worker group from the last checkpoint after a worker dies
    max_failures: int = Field(2, ge=0)
    #: testing aid: the worker of this rank kills its own process at this global step, once per
    #: run (a real process death, to exercise recovery); None in real runs
    kill_rank_at_step: tuple[int, int] | None = None
    #: testing aid: this rank's batch of this step gets NaN labels for this task
    nan_label_at: NanLabelAt | None = None


class TrainJobConfig(Strict):
    """``python -m pipeline train``: one run on Ray Train (logged whole with the run)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    data: DataSection = Field(default_factory=DataSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    failure: FaultSection = Field(default_factory=FaultSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    #: Ray Train storage (local folder or a URI such as s3://bucket/path); default <out>/ray
    storage_path: str | None = None
    name: str | None = None
    #: raw generator folder (has oracle/): the oracle's score is logged beside the model's
    raw: str | None = None


def _check_kwargs(factory: Any, params: dict[str, Any], where: str, skip: set[str]) -> None:
    """Unknown keyword arguments fail here (with the accepted names), not inside a worker."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        # the class forwards **kw to its base: accept the base's names as well
        accepted = set()
        for cls in getattr(factory, "__mro__", [factory]):
            init = getattr(cls, "__init__", None)
            try:
                accepted |= set(inspect.signature(init).parameters)
            except (TypeError, ValueError):
                continue
    else:
        accepted = set(sig.parameters)
    accepted -= {"self", "args", "kw", "kwargs"} | skip
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; accepted: {sorted(accepted)}")


# ---- steps check (issue 12, "a training set-up that fits the data") ---------------------------

#: a run with fewer optimiser steps than this gets a warning: the model barely leaves its
#: initialisation (small logs trained with WeChat-sized batches take a few dozen steps)
MIN_STEPS = 300


def planned_steps(cfg: TrainConfig, rows_per_rank: list[int]) -> tuple[int, int]:
    """``(steps per epoch, steps of the run)``: every rank runs ``ceil(max_r rows_r /
    batch_size)`` steps an epoch (as the Ray workers agree), for ``epochs`` epochs, capped by
    ``max_steps``.

    Example:
        >>> planned_steps(TrainConfig(batch_size=100, epochs=2), [1000, 950])
        (10, 20)
    """
    per_epoch = -(-max(rows_per_rank, default=0) // cfg.batch_size)
    total = per_epoch * cfg.epochs
    return per_epoch, (min(total, cfg.max_steps) if cfg.max_steps is not None else total)


def steps_warning(cfg: TrainConfig, rows_per_rank: list[int], min_steps: int = MIN_STEPS) -> str | None:
    """A warning when the run would take fewer than ``min_steps`` optimiser steps, with the
    computed numbers and the epochs that would reach ``min_steps``; None otherwise.

    Args:
        cfg: the run's config; rows_per_rank: training rows of each worker (one entry locally).
    """
    per_epoch, total = planned_steps(cfg, rows_per_rank)
    if total >= min_steps or per_epoch == 0:
        return None
    if cfg.max_steps is not None and total == cfg.max_steps:
        hint = f"raise train.max_steps (now {cfg.max_steps})"
    else:
        hint = f"set train.epochs={-(-min_steps // per_epoch)} or a smaller train.batch_size"
    return (f"warning: this run takes {total} optimiser steps, fewer than {min_steps}: "
            f"{sum(rows_per_rank)} training rows on {len(rows_per_rank)} worker(s), batch_size {cfg.batch_size} "
            f"per worker = {per_epoch} steps per epoch x {cfg.epochs} epoch(s)"
            f"{f', max_steps {cfg.max_steps}' if cfg.max_steps is not None else ''}; {hint}")
