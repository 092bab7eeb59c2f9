"""DB-MTL: Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi & Zhang, 2023).

Loss-scale balancing: every task loss is log-transformed (``log(L_i + eps)``, so the task
gradient is ``g_i / (L_i + eps)``). Gradient-magnitude balancing: an EMA ``m_i`` of each task's
log-loss gradient over the shared parameters (``m <- g + beta/t^sigma (m - g)``, ``m_0 = 0``, as
LibMTL's reference implementation), ``alpha_i = max_j ||m_j|| / ||m_i||`` and the shared update
``sum_i alpha_i m_i``.

Towers get ``grad log L_i`` (as LibMTL). Embeddings: ``sum_i alpha_i grad log L_i`` of this
batch (through ``task_grad_scale``; the EMA is kept only for the dense shared parameters).
Between refreshes (``refresh_every > 1``) the shared parameters get ``sum_i alpha_i grad log L_i``
with the cached ``alpha`` (no EMA). Cost: per-task gradients + a plain backward; a ``[K, P]``
buffer. A zero task gradient gives ``alpha_i = max/eps`` times a zero vector: no effect on the
shared update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy

_EPS = 1e-8


class DBMTL(Strategy):
    """DB-MTL.

    Defaults are LibMTL's (``--DB_beta 0.9 --DB_beta_sigma 0``): the EMA factor stays ``0.9``.
    (A positive ``beta_sigma`` makes it vanish, e.g. ``0.9 / t^0.5 < 0.1`` after 81 steps, so the
    EMA degenerates to this batch's gradient.)

    Args:
        num_tasks: ``K``.
        beta: EMA constant (LibMTL ``DB_beta``, default 0.9).
        beta_sigma: decay exponent of ``beta / t^sigma`` (LibMTL ``DB_beta_sigma``, default 0).
    """

    loss_driven_state = True

    uses_gradients = True

    def __init__(self, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0, **kw) -> None:
        super().__init__(num_tasks, **kw)
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.grad_buffer: Tensor | None = None
        self.ema_steps = 0

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state.update(grad_buffer=self.grad_buffer, ema_steps=self.ema_steps)
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.grad_buffer = state["grad_buffer"]
        self.ema_steps = int(state["ema_steps"])

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert grads is not None
        inv = 1.0 / (stats + _EPS)
        log_grads = grads * inv.to(grads.dtype).unsqueeze(1)
        self.ema_steps += 1
        if self.grad_buffer is None or self.grad_buffer.shape != log_grads.shape:
            self.grad_buffer = torch.zeros_like(log_grads)
        decay = self.beta / self.ema_steps**self.beta_sigma
        self.grad_buffer = log_grads + decay * (self.grad_buffer - log_grads)
        norms = self.grad_buffer.norm(dim=1)
        alpha = norms.max() / (norms + _EPS)
        shared = alpha @ self.grad_buffer
        return Combination(loss_weights=inv.to(losses.dtype), grad_scale=alpha.to(losses.dtype), shared_grad=shared)

    def reuse(self, cached: Combination, losses: Tensor, stats: Tensor) -> Combination:
        return Combination(loss_weights=(1.0 / (stats + _EPS)).to(losses.dtype), grad_scale=cached.grad_scale)
