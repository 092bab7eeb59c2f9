"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

``w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with ``r_k(t-1) = L_k(t-1) / L_k(t-2)``,
where ``L_k(t)`` is task ``k``'s average loss over period ``t`` (an epoch in the paper);
``w = 1`` until two periods are complete. Weights sum to ``K``.

Periods end when the trainer calls :meth:`end_epoch` (paper), or every ``period_steps`` steps.
Losses that drive the averages are the (optionally all-reduced) ``state_losses``.
Embeddings and towers get the weighted sum. Cost: a plain step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy


class DWA(Strategy):
    """Dynamic Weight Average.

    Args:
        num_tasks: ``K``.
        temperature: ``T`` (paper: 2).
        period_steps: end a period every this many steps; ``None`` = on :meth:`end_epoch`.
    """

    loss_driven_state = True

    def __init__(self, num_tasks: int, temperature: float = 2.0, period_steps: int | None = None, **kw) -> None:
        super().__init__(num_tasks, **kw)
        if temperature <= 0:
            raise ValueError(f"DWA: temperature must be > 0, got {temperature}")
        if period_steps is not None and period_steps < 1:
            raise ValueError(f"DWA: period_steps must be >= 1, got {period_steps}")
        self.temperature = float(temperature)
        self.period_steps = period_steps
        self.register_buffer("history", torch.ones(2, num_tasks))  # [L(t-1), L(t-2)]
        self.register_buffer("periods_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_sum", torch.zeros(num_tasks))
        self.register_buffer("running_count", torch.zeros(()))

    def weights(self) -> Tensor:
        """Current weights ``[K]`` (sum ``K``)."""
        ratio = self.history[0] / self.history[1].clamp_min(1e-12)
        w = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(self.periods_done >= 2, w, torch.ones_like(w))

    def end_epoch(self) -> None:
        """Close the current period: its average loss becomes ``L(t-1)``."""
        mean = self.running_sum / self.running_count.clamp_min(1.0)
        has = self.running_count > 0
        new_hist = torch.stack([mean, self.history[0]])
        self.history.copy_(torch.where(has, new_hist, self.history))
        self.periods_done.add_(has.long())
        self.running_sum.zero_()
        self.running_count.zero_()

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        w = self.weights().to(losses.dtype)
        self.running_sum.add_(stats.to(self.running_sum.dtype))
        self.running_count.add_(1.0)
        if self.period_steps is not None and (self.step_count + 1) % self.period_steps == 0:
            self.end_epoch()
        return Combination(loss_weights=w)
