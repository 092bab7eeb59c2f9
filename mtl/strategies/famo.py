"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liang, Chen, Wang & Liu, NeurIPS 2023).

Task logits ``xi`` (``z = softmax(xi)``), the minimisation objective is
``sum_i z_i / c * log(L_i - L_i^*)`` with ``c = sum_i z_i / (L_i - L_i^*)`` (``L^*`` = 0 by
default), i.e. loss weights ``z_i / (c (L_i - L_i^*))``. After a step, with the losses before
(``prev``) and after (``curr``), ``delta = log(prev - L^*) - log(curr - L^*)`` and ``xi`` takes
one Adam step (``lr``, L2 weight decay ``gamma``) along ``J_softmax(xi)^T delta`` — as the
official code (``torch.optim.Adam(lr=w_lr, weight_decay=gamma)``; defaults 0.025 and 0.01).

The official code re-evaluates the same batch after the optimizer step (:meth:`update`); if
the trainer does not call :meth:`update`, the next step's losses serve as ``curr``.
Embeddings and towers get the weighted sum. Cost: a plain step (+ one forward if the trainer
calls :meth:`update` on the same batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy, psqrt

_EPS = 1e-8


class FAMO(Strategy):
    """FAMO.

    Args:
        num_tasks: ``K``.
        lr: Adam learning rate of the task logits (official ``w_lr``).
        gamma: Adam weight decay of the logits (official ``gamma``).
        betas, adam_eps: Adam constants (``torch.optim.Adam`` defaults).
    """

    loss_driven_state = True
    post_step_losses = True

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        **kw,
    ) -> None:
        super().__init__(num_tasks, **kw)
        self.lr, self.gamma, self.betas, self.adam_eps = float(lr), float(gamma), betas, float(adam_eps)
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("min_losses", torch.zeros(num_tasks))
        self.register_buffer("prev_losses", torch.ones(num_tasks))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_step", torch.zeros(()))

    def set_min_losses(self, losses: Tensor) -> None:
        self.min_losses.copy_(losses.detach())

    def weights(self, losses: Tensor) -> Tensor:
        """Loss weights ``z_i / (c D_i)`` for detached losses ``[K]``."""
        z = torch.softmax(self.logits, dim=0)
        d = losses - self.min_losses + _EPS
        c = (z / d).sum()
        return z / (c * d)

    def update(self, curr_losses: Tensor) -> None:
        """One Adam step on the logits from the losses after the model update (no-op if
        there is no pending step)."""
        curr = curr_losses.detach().to(self.logits.dtype)
        delta = torch.log(self.prev_losses - self.min_losses + _EPS) - torch.log(curr - self.min_losses + _EPS)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits
        b1, b2 = self.betas
        step = self.adam_step + 1.0
        exp_avg = b1 * self.exp_avg + (1 - b1) * grad
        exp_avg_sq = b2 * self.exp_avg_sq + (1 - b2) * grad * grad
        denom = psqrt(exp_avg_sq / (1 - b2**step)) + self.adam_eps
        new_logits = self.logits - self.lr * (exp_avg / (1 - b1**step)) / denom
        p = self.pending
        self.logits.copy_(torch.where(p, new_logits, self.logits))
        self.exp_avg.copy_(torch.where(p, exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(p, exp_avg_sq, self.exp_avg_sq))
        self.adam_step.copy_(torch.where(p, step, self.adam_step))
        self.pending.fill_(False)

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        self.update(stats)  # lagged variant: no-op if the trainer already called update()
        w = self.weights(stats.to(self.logits.dtype))
        self.prev_losses.copy_(stats)
        self.pending.fill_(True)
        return Combination(loss_weights=w.to(losses.dtype))
