"""IMTL-G: gradient part of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang,
Liao & Zhang, ICLR 2021).

The update ``g = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` has equal projections onto every
unit task gradient: ``g . u_i = g . u_j``. On the Gram matrix: ``Gram alpha = t n`` with
``n_i = ||g_i||``, so ``alpha = Gram^+ n / (1^T Gram^+ n)`` (equal to the closed form
``alpha_{2:K} = g_1 U^T (D U^T)^{-1}`` of the paper and LibMTL when the gradients are linearly
independent). With ``alpha = D^{-1/2} z`` (``D = diag Gram``) the system is ``C z = t 1`` for the
correlation matrix ``C``: solved there, with a ridge of 1e-13 on ``C``'s unit diagonal for
dependent gradients, the answer does not depend on any task gradient's scale. Embeddings get the same coefficients. A zero task gradient has no unit vector:
it gets ``alpha_i = 0`` and the others are balanced among themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies._solvers import scaled_solve
from mtl.strategies.base import Combination, Strategy, active_tasks, normalized_gram, psqrt


def imtl_g_coefficients(gram: Tensor) -> Tensor:
    """``alpha`` (float64, sums to 1): ``Gram^{-1} n`` solved on the correlation matrix with a
    ridge relative to its unit diagonal (:func:`mtl.strategies._solvers.scaled_solve`); for
    dependent gradients (e.g. exactly opposed ones at a Pareto-stationary point) this is the
    limit that gives equal (zero) projections."""
    m, _ = normalized_gram(gram)
    act = active_tasks(m).to(m.dtype)
    n = psqrt(m.diagonal().clamp_min(0.0)) * act
    m = m * act.unsqueeze(0) * act.unsqueeze(1) + torch.diag(1.0 - act)
    alpha = scaled_solve(m, n.unsqueeze(1))[:, 0]
    return alpha / alpha.sum()


class IMTLG(Strategy):
    """IMTL-G (gradient balancing only; combine with a loss-scale method for IMTL-L)."""

    uses_gradients = True
    gram_only = True

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=imtl_g_coefficients(gram).to(losses.dtype))
