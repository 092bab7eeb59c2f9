"""Training in one process (no Ray): the same :func:`~pipeline.train.step.build`,
:func:`~pipeline.train.step.train_step` and :func:`~pipeline.train.loop.fit` as every Ray worker,
on the whole ``train`` split held as tensors.

Example:
    >>> # result = train_local(TrainConfig(), "runs/demo/processed")
    >>> # result.metrics["valid/score"]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl.features import FeatureSpec
from mtl.models import MultiTaskModel
from pipeline.data import MaterializedShard, arrow_to_batch, iter_local_batches, load_spec, read_split
from pipeline.train.config import TrainConfig, steps_warning
from pipeline.train.evaluate import predict_batches, score_predictions
from pipeline.train.holdout import selection_batches
from pipeline.train.loop import FitResult, LoopHooks, fit
from pipeline.train.step import TrainState, build


@dataclass
class TrainResult:
    model: MultiTaskModel
    spec: FeatureSpec
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    fit: FitResult | None = None
    state: TrainState | None = None


def default_threads() -> int:
    """The cores this process may use (its CPU affinity), not a constant."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def train_local(cfg: TrainConfig, data_dir: str | Path, on_log: Callable[[int, dict[str, Any]], None] | None = None,
                on_eval: Callable[[int, dict[str, float]], None] | None = None, valid_split: str = "valid") -> TrainResult:
    """Train on the ``train`` split, evaluate on ``valid_split`` after every epoch (on its
    selection rows only when ``cfg.valid_holdout`` is set).

    Args:
        on_log: ``(step, record)`` every ``cfg.log_every`` steps (running losses).
        on_eval: ``(step, metrics)`` after each evaluation.
    """
    torch.set_num_threads(cfg.torch_threads or default_threads())
    spec = load_spec(data_dir)
    state = build(cfg, spec)
    table = read_split(data_dir, "train")
    if table.num_rows == 0:
        raise ValueError(f"{data_dir}/train: no training rows")
    shard = MaterializedShard(arrow_to_batch(table, spec), cfg.batch_size, seed=cfg.seed)
    warning = steps_warning(cfg, [table.num_rows])  # issue 12: too few steps for the data
    if warning:
        print(f"train_local: {warning}", file=sys.stderr)
    del table
    # with train.valid_holdout: only the selection rows (the report rows stay unseen)
    valid = selection_batches(list(iter_local_batches(data_dir, valid_split, cfg.eval_batch_size, spec=spec)),
                              cfg.valid_holdout)

    def evaluate(s: TrainState) -> dict[str, float]:
        probs, labels, meta = predict_batches(s.eval_model, valid)
        if labels is None:
            raise ValueError(f"{data_dir}/{valid_split} has no labels to evaluate")
        return score_predictions(probs, labels, meta.get("_user"), spec.tasks, valid_split)

    hooks = LoopHooks(
        evaluate=evaluate,
        on_log=(lambda s, rec: on_log(s.step, rec)) if on_log else LoopHooks.on_log,
        on_eval=(lambda s, m, _best: on_eval(s.step, m)) if on_eval else LoopHooks.on_eval,
    )
    result = fit(state, shard.epoch, hooks)
    metrics = dict(result.evaluations[-1]) if result.evaluations else {}
    if cfg.early_stopping.patience is not None and result.best is not None:
        metrics = dict(result.best)
    metrics["train/steps"] = float(state.step)
    return TrainResult(model=state.model, spec=spec, history=result.history, metrics=metrics, fit=result, state=state)
