"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022).

The Nash bargaining weights solve ``(G G^T) alpha = 1 / alpha`` (element-wise), ``alpha > 0``;
the update is ``sum_i alpha_i g_i``. The reference code approximates this with up to 20 CCP steps
of cvxpy; here it is the exact minimiser of the strictly convex
``alpha^T Gram alpha / 2 - sum_i log alpha_i`` by damped Newton on the device
(:func:`mtl.strategies._solvers.nash_weights`: solved on the correlation matrix, so no task's
gradient scale matters; warm-started from the previous step's solution, rescaled, with a cold
start alongside that replaces a warm start which has not converged).

Update-norm clipping (``max_norm``, default 1.0 as the reference code): the reference calls
``clip_grad_norm_(shared_parameters, max_norm)`` after its backward. At the exact solution
``||sum_i alpha_i g_i||^2 = alpha^T Gram alpha = K``, so that clip always fires for ``K >= 2``
with ``max_norm = 1``; here it is applied to the coefficients, ``c = alpha * min(1, max_norm /
||sum_i alpha_i g_i||)`` (the norm over the dense shared parameters the Gram matrix covers, from
the Gram matrix), so it needs no trainer support and embeddings are scaled alike.
``max_norm=0`` disables it (the paper's unclipped update).

``gram_normalization``: the reference code divides the Gram matrix by its Frobenius norm
before its solver but keeps that factor in its constraints
(``log(alpha_i * ||Gram||_F) + log((Gram / ||Gram||_F) alpha)_i >= 0``, i.e.
``alpha_i (Gram alpha)_i >= 1``), so its weights are the paper's: the default ``"none"``
matches it. ``"frobenius"`` solves ``(Gram / ||Gram||_F) alpha = 1 / alpha`` instead, whose
``alpha`` is ``||Gram||_F^{1/2}`` times the paper's (kept for compatibility; not the reference's
behaviour).

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


def clip_coefficients(coeff: Tensor, gram: Tensor, max_norm: float) -> Tensor:
    """``coeff * min(1, max_norm / ||sum_i coeff_i g_i||)`` (``clip_grad_norm_`` of the combined
    update, computed from the Gram matrix); ``max_norm <= 0``: unchanged."""
    if max_norm <= 0:
        return coeff
    g = gram.to(coeff.dtype)
    norm = psqrt((coeff @ g @ coeff).clamp_min(0.0))
    # clip_grad_norm_'s factor max_norm / (norm + 1e-6), capped at 1
    return coeff * (max_norm / (norm + 1e-6)).clamp(max=1.0)


class NashMTL(Strategy):
    """Nash-MTL.

    Defaults that differ from the reference code (``optim_niter=20``, ``max_norm=1.0``,
    ``update_weights_every=1``): ``iters`` counts damped-Newton steps (each start), not CCP
    steps; the solution is the exact one either way (to rounding) where the reference's CCP
    converged. The clip is applied to the coefficients, not to ``.grad`` (same result for the
    dense shared parameters).

    Args:
        num_tasks: ``K``.
        gram_normalization: ``"none"`` (the paper and the reference code) or ``"frobenius"``
            (see the module docstring).
        iters: Newton iterations per solve and per start (fixed; the warm start is the previous
            step's solution, as the reference code warm-starts its CCP).
        warm_start: start Newton from the previous solution too (a cold start always runs).
        max_norm: clip the norm of the combined shared update to this (reference: 1.0);
            ``0`` disables clipping.
    """

    uses_gradients = True
    gram_only = True

    def __init__(
        self,
        num_tasks: int,
        gram_normalization: str = "none",
        iters: int = 20,
        warm_start: bool = True,
        max_norm: float = 1.0,
        **kw,
    ) -> None:
        super().__init__(num_tasks, **kw)
        if gram_normalization not in ("none", "frobenius"):
            raise ValueError(f"NashMTL: unknown gram_normalization {gram_normalization!r}")
        if max_norm < 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0, got {max_norm}")
        self.gram_normalization, self.iters, self.warm_start = gram_normalization, int(iters), warm_start
        self.max_norm = float(max_norm)
        self._beta: Tensor | None = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "beta": self._beta}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._beta = state["beta"]

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        init = self._beta if self.warm_start else None
        alpha, self._beta = nash_coefficients(gram, self.gram_normalization, self.iters, init)
        c = clip_coefficients(alpha, gram, self.max_norm)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
