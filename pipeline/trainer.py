"""Training and evaluation of a multi-task model on a preprocessed dataset (one process).

The training config (:class:`TrainConfig`) is the one the Ray Train trainer extends; the step
itself (model forward with ``task_grad_scale``, per-task losses, the strategy's combination,
one backward, :func:`mtl.optim.build_optimizer`'s update) is the same code path.

Example:
    >>> # result = train_local(TrainConfig(), "runs/demo/processed")
    >>> # result.metrics["valid/score"]
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.nn import functional as F

from mtl.features import FeatureSpec
from mtl.metrics import WECHAT_ACTION_WEIGHTS, auc, user_auc, weighted_score
from mtl.models import MODELS, MultiTaskModel, build_model
from mtl.optim import build_optimizer
from mtl.precision import DEFAULT_PRECISION, check_precision
from mtl.strategies import STRATEGIES, build_strategy, model_backward
from pipeline.data import iter_local_batches, load_spec, read_split


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """An architecture from :data:`mtl.models.MODELS` and its keyword arguments."""

    name: str = "mmoe"
    params: dict[str, Any] = Field(default_factory=dict)


class StrategyConfig(_Strict):
    """A strategy from :data:`mtl.strategies.STRATEGIES` and its keyword arguments."""

    name: str = "equal"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    lr: float = 1e-3
    embedding_lr: float | None = None
    weight_decay: float = 0.0


class TrainConfig(_Strict):
    """Everything a training run depends on besides the data (logged with the run)."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    #: body precision (mtl.precision): "auto" = bfloat16 mixed precision where the device has
    #: native bfloat16 matrix units (AVX512-BF16/AMX CPUs, CUDA sm80+), float32 elsewhere;
    #: "float32" for exact float32 arithmetic. Parameters, optimizer state and logits stay float32.
    precision: str = DEFAULT_PRECISION
    batch_size: int = 4096
    epochs: int = 1
    max_steps: int | None = None
    eval_batch_size: int = 32768
    torch_threads: int = 2
    log_every: int = 20

    def model_post_init(self, __context: Any) -> None:
        if self.model.name not in MODELS:
            raise ValueError(f"model.name {self.model.name!r} unknown; registered: {sorted(MODELS)}")
        check_precision(self.precision)
        if "compute_dtype" in self.model.params:
            raise ValueError("set the body's precision with train.precision, not model.params.compute_dtype")
        if self.strategy.name not in STRATEGIES:
            raise ValueError(f"strategy.name {self.strategy.name!r} unknown; registered: {sorted(STRATEGIES)}")


@dataclass
class TrainResult:
    model: MultiTaskModel
    spec: FeatureSpec
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """``[K]`` per-task BCE; with a down-sampling ``mask`` each task averages its own rows."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if mask is None:
        return loss.mean(0)
    return (loss * mask).sum(0) / mask.sum(0).clamp_min(1.0)


def build(cfg: TrainConfig, spec: FeatureSpec) -> tuple[MultiTaskModel, Any, list[torch.optim.Optimizer]]:
    """Seeded model, strategy and optimizers for ``spec`` (the model's default set-up, plus
    Adam for a strategy's own parameters such as Uncertainty weighting's log-variances)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, spec, sparse_gradients=True, compute_dtype=cfg.precision, **cfg.model.params)
    strategy_params = dict(cfg.strategy.params)
    if "seed" in _init_args(STRATEGIES[cfg.strategy.name]):
        strategy_params.setdefault("seed", cfg.seed)
    strategy = build_strategy(cfg.strategy.name, num_tasks=spec.num_tasks, **strategy_params)
    optimizers: list[torch.optim.Optimizer] = [build_optimizer(
        model, lr=cfg.optimizer.lr, embedding_lr=cfg.optimizer.embedding_lr, weight_decay=cfg.optimizer.weight_decay
    )]
    strategy_params = [p for p in strategy.parameters() if p.requires_grad]
    if strategy_params:
        optimizers.append(torch.optim.Adam(strategy_params, lr=cfg.optimizer.lr))
    return model, strategy, optimizers


def _init_args(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def train_local(cfg: TrainConfig, data_dir: str | Path, on_log: Any = None) -> TrainResult:
    """Train on the ``train`` split, evaluate on ``valid``; ``on_log(step, record)`` gets the
    running losses every ``cfg.log_every`` steps (e.g. to log them to MLflow)."""
    torch.set_num_threads(cfg.torch_threads)
    spec = load_spec(data_dir)
    model, strategy, optimizers = build(cfg, spec)
    table = read_split(data_dir, "train")
    history: list[dict[str, float]] = []
    step = 0
    running: list[Tensor] = []
    for epoch in range(cfg.epochs):
        model.train()
        for batch in iter_local_batches(
            data_dir, "train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, spec=spec, table=table
        ):
            if batch.labels is None:
                raise ValueError(f"{data_dir}/train has no labels")
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            mask = batch.mask
            losses, _ = model_backward(
                strategy, model, batch.features, batch.labels,
                loss_fn=lambda logits, labels, m=mask: masked_bce(logits, labels, m),
                separable_losses=True,  # masked_bce's loss k reads only logit column k
            )
            reg = model.regularization()
            if reg.requires_grad:
                reg.backward()
            for opt in optimizers:
                opt.step()
            running.append(losses.detach())
            step += 1
            if step % cfg.log_every == 0:
                strategy.raise_if_nonfinite()  # the deferred NaN check (accelerators); we read the device here anyway
                mean = torch.stack(running).mean(0)
                record = {"step": float(step), "epoch": float(epoch)}
                record.update({f"train/loss_{t}": float(v) for t, v in zip(spec.tasks, mean)})
                history.append(record)
                running.clear()
                if on_log is not None:
                    on_log(step, record)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        strategy.end_epoch()
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    strategy.raise_if_nonfinite()
    if step == 0:
        raise ValueError(f"{data_dir}/train: no training rows")
    result = TrainResult(model=model, spec=spec, history=history)
    result.metrics = evaluate(model, data_dir, "valid", spec, cfg.eval_batch_size)[0]
    result.metrics["train/steps"] = float(step)
    return result


@torch.no_grad()
def predict(model: MultiTaskModel, data_dir: str | Path, split: str, spec: FeatureSpec,
            batch_size: int = 32768) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Probabilities ``[N, K]``, labels ``[N, K]`` (or None) and meta columns of a split."""
    model.eval()
    probs, labels, meta = [], [], {}
    for batch in iter_local_batches(data_dir, split, batch_size, spec=spec):
        probs.append(torch.sigmoid(model(batch.features)).numpy())
        if batch.labels is not None:
            labels.append(batch.labels.numpy())
        for k, v in batch.meta.items():
            meta.setdefault(k, []).append(v.numpy())
    return (
        np.concatenate(probs),
        np.concatenate(labels) if labels else None,
        {k: np.concatenate(v) for k, v in meta.items()},
    )


def score_predictions(probs: np.ndarray, labels: np.ndarray, users: np.ndarray | None,
                      tasks: list[str], prefix: str) -> dict[str, float]:
    """Per-task AUC and (with users) uAUC and the weighted score over tasks with an official
    weight (all tasks weighted 1 otherwise)."""
    metrics: dict[str, float] = {}
    uaucs: dict[str, float] = {}
    for k, task in enumerate(tasks):
        y = labels[:, k]
        if 0 < y.sum() < len(y):
            metrics[f"{prefix}/auc_{task}"] = auc(y, probs[:, k])
        if users is not None:
            u = user_auc(y, probs[:, k], users)
            if not math.isnan(u):
                uaucs[task] = metrics[f"{prefix}/uauc_{task}"] = u
    if uaucs:
        weights = WECHAT_ACTION_WEIGHTS if all(t in WECHAT_ACTION_WEIGHTS for t in uaucs) else {t: 1.0 for t in uaucs}
        metrics[f"{prefix}/score"] = weighted_score(uaucs, weights)
    return metrics


def evaluate(model: MultiTaskModel, data_dir: str | Path, split: str, spec: FeatureSpec,
             batch_size: int = 32768) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    probs, labels, meta = predict(model, data_dir, split, spec, batch_size)
    if labels is None:
        raise ValueError(f"{data_dir}/{split} has no labels to evaluate")
    return score_predictions(probs, labels, meta.get("_user"), spec.tasks, split), probs, meta
