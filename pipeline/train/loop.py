"""The one training loop, shared by the local run and every Ray Train worker: epochs of
:func:`~pipeline.train.step.train_step`, running losses every ``log_every`` steps, evaluation per
epoch (and every ``eval_every_steps``), early stopping with the best weights restored. With a
weight average (``train.weight_average``) the averaged weights are evaluated, and they are the
weights the run ends with.

What differs between a local run and a Ray worker is passed in as :class:`LoopHooks`: where
batches come from, how evaluation gathers predictions, where records and checkpoints go.

Example:
    >>> # result = fit(state, shard.epoch, LoopHooks(evaluate=lambda s: evaluate_local(s)))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipeline.data import Batch
from pipeline.train.step import TrainState, train_step


def _noop(*_args: Any, **_kw: Any) -> None:
    return None


@dataclass
class LoopHooks:
    """What a loop does besides stepping.

    Args:
        evaluate: ``state -> metrics`` on the validation split (the same dict on every rank).
        on_log: ``(state, record)`` every ``log_every`` steps: running mean losses over ranks
            (``train/loss_<task>``), task-gradient diagnostics when the strategy computed any.
        on_eval: ``(state, metrics, is_best)`` after each evaluation (checkpoints, reports).
        on_step: ``state`` after every step (e.g. checkpoints every N steps).
        check_finite: ``state -> None``, raising if any rank saw a non-finite loss (called
            when logging and at the end of each epoch).
        mean_over_ranks: ``[K] -> [K]`` for the logged losses (identity in one process).
    """

    evaluate: Callable[[TrainState], dict[str, float]]
    on_log: Callable[[TrainState, dict[str, Any]], None] = _noop
    on_eval: Callable[[TrainState, dict[str, float], bool], None] = _noop
    on_step: Callable[[TrainState], None] = _noop
    check_finite: Callable[[TrainState], None] = lambda state: state.strategy.raise_if_nonfinite()
    mean_over_ranks: Callable[[Tensor], Tensor] = lambda t: t


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    stopped_early: bool = False


def fit(state: TrainState, epoch_batches: Callable[[int, int], Iterator[Batch]], hooks: LoopHooks) -> FitResult:
    """Train from where ``state`` stands (``epoch``, ``step_in_epoch``, ``step``) to the end.

    Args:
        epoch_batches: ``(epoch, skip) -> batches`` of that epoch after the first ``skip``.
    """
    cfg = state.cfg
    result = FitResult()
    stop = _EarlyStop.from_state(state)
    running: list[Tensor] = []
    while state.epoch < cfg.epochs and not stop.stopped and not _at_max(state):
        for batch in epoch_batches(state.epoch, state.step_in_epoch):
            running.append(train_step(state, batch))
            hooks.on_step(state)
            if state.step % cfg.log_every == 0:
                hooks.check_finite(state)
                result.history.append(_log_record(state, running, hooks))
                running.clear()
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                _evaluate(state, hooks, stop, result)
            if _at_max(state) or stop.stopped:
                break
        else:  # the epoch ran to its end
            state.strategy.end_epoch()
            state.epoch += 1
            state.step_in_epoch = 0
        hooks.check_finite(state)
        if running:
            result.history.append(_log_record(state, running, hooks))
            running.clear()
        if not stop.stopped and state.extra.get("last_eval_step") != state.step:
            _evaluate(state, hooks, stop, result)
    stop.restore_best(state)
    result.best, result.stopped_early = stop.best_metrics, stop.stopped
    return result


def _at_max(state: TrainState) -> bool:
    return state.cfg.max_steps is not None and state.step >= state.cfg.max_steps


def _log_record(state: TrainState, running: list[Tensor], hooks: LoopHooks) -> dict[str, Any]:
    mean = hooks.mean_over_ranks(torch.stack(running).mean(0)).tolist()
    now = time.perf_counter()
    record: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
    last = state.extra.get("_last_log_time")
    if last is not None:  # wall time per step since the last record (evaluations excluded)
        record["perf/step_s"] = (now - last - state.extra.pop("_eval_time", 0.0)) / len(running)
    record.update({f"train/loss_{t}": float(v) for t, v in zip(state.spec.tasks, mean)})
    grams = state.monitor.read()
    if grams is not None:
        record["gradients"] = grams
    hooks.on_log(state, record)
    state.extra["_last_log_time"] = time.perf_counter()
    return record


def _evaluate(state: TrainState, hooks: LoopHooks, stop: "_EarlyStop", result: FitResult) -> None:
    started = time.perf_counter()
    metrics = dict(hooks.evaluate(state))
    metrics["step"], metrics["epoch"] = float(state.step), float(state.epoch)
    is_best = stop.update(state, metrics)
    score = metrics.get(stop.metric)
    if not is_best and score is not None and not math.isnan(score):
        _cut_lr_on_plateau(state)
    state.extra["last_eval_step"] = state.step
    result.evaluations.append(metrics)
    hooks.on_eval(state, metrics, is_best)
    state.extra["_eval_time"] = state.extra.get("_eval_time", 0.0) + time.perf_counter() - started


def _cut_lr_on_plateau(state: TrainState) -> None:
    """``train.lr_plateau``: every ``patience`` evaluations in a row without a new best, all
    learning rates times ``factor`` (at least ``min_lr``). The rates live in the optimizers'
    param groups, so checkpoints carry them; the metrics are the same on every rank, so is the cut."""
    plateau = state.cfg.lr_plateau
    since = state.extra.get("evals_since_best", 0)
    if plateau is None or since == 0 or since % plateau.patience:
        return
    for opt in state.optimizers:
        for group in opt.param_groups:
            group["lr"] = max(group["lr"] * plateau.factor, plateau.min_lr)
    state.extra["lr_cuts"] = state.extra.get("lr_cuts", 0) + 1


class _EarlyStop:
    """The best evaluation so far (its weights kept on the host) and the patience counter; kept
    in ``state.extra`` so that checkpoints carry it."""

    def __init__(self, metric: str, patience: int | None, min_delta: float, state: TrainState) -> None:
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.state = state

    @classmethod
    def from_state(cls, state: TrainState) -> "_EarlyStop":
        es = state.cfg.early_stopping
        state.extra.setdefault("best_score", -math.inf)
        state.extra.setdefault("evals_since_best", 0)
        state.extra.setdefault("best_metrics", None)
        state.extra.setdefault("best_model", None)
        return cls(es.metric, es.patience, es.min_delta, state)

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.state.extra["evals_since_best"] >= self.patience

    @property
    def best_metrics(self) -> dict[str, float] | None:
        return self.state.extra["best_metrics"]

    def update(self, state: TrainState, metrics: dict[str, float]) -> bool:
        score = metrics.get(self.metric)
        if score is None or math.isnan(score):
            return False
        if score > state.extra["best_score"] + self.min_delta:
            state.extra["best_score"] = float(score)
            state.extra["best_metrics"] = dict(metrics)
            state.extra["evals_since_best"] = 0
            state.extra["best_model"] = {k: v.detach().to("cpu", copy=True) for k, v in state.eval_model.state_dict().items()}
            return True
        state.extra["evals_since_best"] += 1
        return False

    def restore_best(self, state: TrainState) -> None:
        """Leave in ``state.model`` the weights the run ends with: the best evaluation's (when
        early stopping is on), else the weight average's (when the run keeps one), else the last."""
        best = state.extra.get("best_model")
        if self.patience is not None and best is not None:
            state.model.load_state_dict(copy.deepcopy(best))
        elif state.eval_model is not state.model:
            state.model.load_state_dict(state.eval_model.state_dict())
