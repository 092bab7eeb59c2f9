"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022).

The Nash bargaining weights solve ``(G G^T) alpha = 1 / alpha`` (element-wise), ``alpha > 0``;
the update is ``sum_i alpha_i g_i``. The reference code approximates this with 20 CCP steps of
cvxpy; here it is the exact minimiser of the strictly convex
``alpha^T Gram alpha / 2 - sum_i log alpha_i`` by damped Newton on the device
(:func:`mtl.strategies._solvers.nash_weights`). ``gram_normalization="frobenius"`` divides the
Gram matrix by its Frobenius norm first, as the reference code does (its ``alpha`` is then
``||Gram||_F^{1/2}`` times the paper's). The reference clips the shared gradient norm
(``max_norm=1``) afterwards: that is the trainer's gradient clipping.

Embeddings get the same coefficients. A zero task gradient has no finite Nash weight: it gets
``alpha_i = 0`` and the others solve the bargaining problem among themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.strategies._solvers import nash_weights
from mtl.strategies.base import Combination, Strategy, active_tasks, normalized_gram, psqrt


def nash_coefficients(
    gram: Tensor, gram_normalization: str = "none", iters: int = 20, init: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)``: the Nash weights and the solver state for a warm start."""
    g = gram.to(torch.float64)
    if gram_normalization == "frobenius":
        g = g / torch.linalg.matrix_norm(g).clamp_min(1e-30)
    m, s = normalized_gram(g)
    act = active_tasks(m).to(m.dtype)
    m = m * act.unsqueeze(0) * act.unsqueeze(1) + torch.diag(1.0 - act)
    alpha, beta = nash_weights(m, iters=iters, init=init)  # (m alpha) alpha = 1 with m = g / s
    return alpha * act / psqrt(s), beta


class NashMTL(Strategy):
    """Nash-MTL.

    Args:
        num_tasks: ``K``.
        gram_normalization: ``"none"`` (the paper's condition) or ``"frobenius"`` (reference code).
        iters: Newton iterations per solve (fixed; warm-started from the previous step's
            solution, as the reference code warm-starts its CCP).
        warm_start: start Newton from the previous solution.
    """

    uses_gradients = True
    gram_only = True

    def __init__(
        self, num_tasks: int, gram_normalization: str = "none", iters: int = 20, warm_start: bool = True, **kw
    ) -> None:
        super().__init__(num_tasks, **kw)
        if gram_normalization not in ("none", "frobenius"):
            raise ValueError(f"NashMTL: unknown gram_normalization {gram_normalization!r}")
        self.gram_normalization, self.iters, self.warm_start = gram_normalization, int(iters), warm_start
        self._beta: Tensor | None = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "beta": self._beta}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._beta = state["beta"]

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        init = self._beta if self.warm_start else None
        c, self._beta = nash_coefficients(gram, self.gram_normalization, self.iters, init)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
