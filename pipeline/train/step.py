"""``build(cfg, spec)`` and ``train_step(state, batch)``: the one training step used by the local
loop, every Ray worker, the benches and Tune trials.

A step: forward with the strategy's ``task_grad_scale``, per-task masked losses, the strategy's
combination and ONE backward (:func:`mtl.strategies.model_backward`), the model's own penalty,
the gradient synchronisation of :mod:`mtl.distributed` (a no-op in one process), global-norm
clipping, the optimizer update, the strategy's state sync and, where the paper does it
(FAMO), the losses re-evaluated on the same batch after the update.

Example:
    >>> # state = build(TrainConfig(), spec)
    >>> # for batch in batches: losses = train_step(state, batch)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mtl.averaging import WeightAverage
from mtl.checkpoint import load_checkpoint, save_checkpoint
from mtl.device import host_to_device
from mtl.diagnostics import GramMonitor
from mtl.distributed import GradientSync
from mtl.features import FeatureSpec
from mtl.models import MultiTaskModel, build_model
from mtl.optim import build_optimizer
from mtl.strategies import STRATEGIES, Strategy, build_strategy, model_backward
from pipeline.data import Batch
from pipeline.train.config import TrainConfig


@dataclass
class TrainState:
    """What a training loop holds: model, strategy, optimizers, the gradient sync, the running
    weight average (``train.weight_average``; None = off) and where the run stands (``step``
    counts optimizer steps over the whole run)."""

    cfg: TrainConfig
    spec: FeatureSpec
    model: MultiTaskModel
    strategy: Strategy
    optimizers: list[torch.optim.Optimizer]
    sync: GradientSync
    device: torch.device
    monitor: GramMonitor
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    average: WeightAverage | None = None

    @property
    def eval_model(self) -> MultiTaskModel:
        """The weights that are evaluated, early-stopped on and kept: the running average once
        it holds a step, else the live model."""
        return self.model if self.average is None else self.average.model_or(self.model)  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """``[K]`` per-task BCE; with a down-sampling ``mask`` each task averages its own rows.

    Example:
        >>> masked_bce(torch.zeros(2, 1), torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [0.0]]))
        tensor([0.6931])
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if mask is None:
        return loss.mean(0)
    return (loss * mask).sum(0) / mask.sum(0).clamp_min(1.0)


def build(cfg: TrainConfig, spec: FeatureSpec, device: torch.device | str = "cpu",
          sync_mode: str | None = None, check_finite: str = "auto") -> TrainState:
    """The seeded model, strategy, optimizers and gradient sync for ``spec`` on ``device``.

    Every rank builds the same initial state from ``cfg.seed``. The model reads
    ``cfg.model_spec(spec)`` (the run's numeric encodings), which ``state.spec`` holds. Optimizers: the library's set-up
    (:func:`mtl.optim.build_optimizer`) plus Adam for a strategy's own parameters (Uncertainty
    weighting's log-variances).

    Args:
        sync_mode: overrides ``cfg.sync`` (e.g. for a bench).
        check_finite: the strategies' finite-loss check (``"deferred"`` in data-parallel loops,
            which check all ranks together when they log).
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    spec = cfg.model_spec(spec)
    model = build_model(cfg.model.name, spec, sparse_gradients=True, compute_dtype=cfg.precision, **cfg.model.params)
    model.to(device)
    params = dict(cfg.strategy.params)
    if "seed" in _init_args(STRATEGIES[cfg.strategy.name]):
        params.setdefault("seed", cfg.seed)
    params.setdefault("check_finite", check_finite)
    strategy = build_strategy(cfg.strategy.name, num_tasks=spec.num_tasks, **params).to(device)
    optimizers: list[torch.optim.Optimizer] = [build_optimizer(
        model, lr=cfg.optimizer.lr, embedding_lr=cfg.optimizer.embedding_lr, weight_decay=cfg.optimizer.weight_decay,
        embedding_weight_decay=cfg.optimizer.embedding_weight_decay,
    )]
    own = [p for p in strategy.parameters() if p.requires_grad]
    if own:
        optimizers.append(torch.optim.Adam(own, lr=cfg.optimizer.lr))
    sync = GradientSync(model, strategy, mode=sync_mode or cfg.sync)
    monitor = GramMonitor(spec.num_tasks)
    strategy.gram_reducer = monitor.wrap(strategy.gram_reducer)
    state = TrainState(cfg, spec, model, strategy, optimizers, sync, device, monitor)
    wa = cfg.weight_average
    if wa is not None:
        state.average = WeightAverage(model, wa.kind, decay=wa.decay, start_step=wa.start_step)
    if strategy.uses_representation:
        state.extra["representation_module"] = representation_module(model)
    return state


def representation_module(model: MultiTaskModel) -> torch.nn.Module:
    """The module whose output is the shared representation (MGDA-UB's ``Z``): Shared-Bottom's
    bottom, MMoE's experts (the per-module forward, which calls them)."""
    if hasattr(model, "bottom"):
        return model.bottom
    if hasattr(model, "experts") and hasattr(model, "forward_modules"):
        model.forward_representation = model.forward_modules  # type: ignore[method-assign]
        return model.experts
    raise ValueError(
        f"strategy mgda_ub needs an architecture with one shared representation (shared_bottom, mmoe), "
        f"not {type(model).__name__}"
    )


def _init_args(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def train_step(state: TrainState, batch: Batch) -> Tensor:
    """One optimizer step on ``batch`` (moved to ``state.device``); returns the detached ``[K]``
    losses of this rank's batch (on the device: no host read)."""
    losses, after_update = backward_and_sync(state, batch)
    apply_update(state, after_update)
    return losses


def backward_and_sync(state: TrainState, batch: Batch) -> tuple[Tensor, Callable[[], Tensor]]:
    """Phase 1: the strategy's one backward, the model's penalty, the gradients averaged over
    ranks. Returns the losses and a function that re-evaluates them on the same batch (for
    strategies that update from the losses after the step)."""
    if batch.labels is None:
        raise ValueError("train_step: the batch has no labels")
    features = {k: host_to_device(v, state.device) for k, v in batch.features.items()}
    labels = host_to_device(batch.labels, state.device)
    mask = None if batch.mask is None else host_to_device(batch.mask, state.device)
    model, strategy = state.model, state.strategy
    model.train()
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    losses, _ = model_backward(
        strategy, model, features, labels,
        loss_fn=lambda logits, y: masked_bce(logits, y, mask),
        separable_losses=True,  # masked_bce's loss k reads only logit column k
        representation_module=state.extra.get("representation_module"),
    )
    reg = model.regularization()
    if reg.requires_grad:
        reg.backward()
    state.sync.sync_gradients()

    @torch.no_grad()
    def losses_after_update() -> Tensor:
        return masked_bce(model(features), labels, mask)

    return losses, losses_after_update


def apply_update(state: TrainState, losses_after_update: Callable[[], Tensor] | None = None) -> None:
    """Phase 2: clipping, the optimizers' step, the strategy's state kept equal across ranks,
    and (FAMO) the strategy's update from the losses re-evaluated after the step."""
    if state.cfg.optimizer.clip_grad_norm is not None:
        clip_global_norm(state.sync.parameters, state.cfg.optimizer.clip_grad_norm)
    for opt in state.optimizers:
        opt.step()
    state.sync.sync_strategy_state()
    if state.strategy.post_step_losses and losses_after_update is not None:
        after = losses_after_update()
        state.strategy.update(state.sync.mean_over_ranks(after) if state.sync.world_size > 1 else after)
    state.step += 1
    state.step_in_epoch += 1
    if state.average is not None:  # after the update: the same parameters on every rank
        state.average.update(state.model, state.step)


def save_state(path: str | Path, state: TrainState, position: dict[str, Any]) -> Path:
    """A checkpoint of ``state`` (model, strategy, optimizers, weight average) and ``position``."""
    return save_checkpoint(path, state.model, state.strategy, state.optimizers, position, average=state.average)


def load_state(path: str | Path, state: TrainState) -> dict[str, Any]:
    """Restore :func:`save_state`'s checkpoint into ``state``; returns the saved position."""
    return load_checkpoint(path, state.model, state.strategy, state.optimizers, map_location=state.device,
                           average=state.average)


@torch.no_grad()
def clip_global_norm(params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients (dense and row-sparse) so their global L2 norm is at most
    ``max_norm``; returns the norm before clipping (on the device, no host read)."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        squares.append(g.detach().float().pow(2).sum())
    if not squares:
        return torch.zeros(())
    norm = torch.stack(squares).sum().sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            g = p.grad.coalesce()
            p.grad = torch.sparse_coo_tensor(g.indices(), g.values() * factor.to(g.dtype), g.shape).coalesce()
        else:
            p.grad.mul_(factor.to(p.grad.dtype))
    return norm
