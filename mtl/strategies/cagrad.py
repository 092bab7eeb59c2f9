"""CAGrad: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021), any K.

With ``g_0`` the average gradient and ``c = alpha ||g_0||``:
``w* = argmin_{w in simplex} g_w^T g_0 + c ||g_w||`` (``g_w = sum_i w_i g_i``), the update
``d = g_0 + c / ||g_w*|| g_w*``, divided by ``1 + alpha^2`` (``rescale=1``, the official
default), ``1 + alpha`` (``rescale=2``) or not (``rescale=0``). ``d`` solves
``max_d min_i g_i^T d`` s.t. ``||d - g_0|| <= c``. The inner problem is solved exactly on the
Gram matrix (:func:`mtl.strategies._solvers.cagrad_simplex`). ``d = sum_i c_i g_i`` with
``c_i = (1/K + lambda w_i) / rescale``.

Embeddings get the same coefficients. Zero task gradients are harmless (they only shrink
``g_0``); ``alpha = 0`` gives the mean gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies._solvers import cagrad_simplex
from mtl.strategies.base import Combination, Strategy, normalized_gram, psqrt


def cagrad_coefficients(gram: Tensor, alpha: float, rescale: int = 1) -> tuple[Tensor, Tensor]:
    """``(coefficients c [K], inner weights w [K])`` in float64."""
    k = gram.shape[0]
    m, _ = normalized_gram(gram)
    b = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    g0_norm = psqrt((b @ m @ b).clamp_min(0.0))
    cval = alpha * g0_norm
    w = cagrad_simplex(m, cval)
    gw_norm = psqrt((w @ m @ w).clamp_min(0.0))
    # no absolute epsilon: ||g_w|| may be far below the largest gradient's norm (a tiny task)
    lam = torch.where(gw_norm > 0, cval / torch.where(gw_norm > 0, gw_norm, torch.ones_like(gw_norm)), torch.zeros_like(gw_norm))
    coeff = b + lam * w
    if rescale == 1:
        coeff = coeff / (1.0 + alpha**2)
    elif rescale == 2:
        coeff = coeff / (1.0 + alpha)
    return coeff, w


class CAGrad(Strategy):
    """CAGrad.

    Args:
        num_tasks: ``K``.
        alpha: the radius factor ``c`` of the paper (official default 0.5).
        rescale: 0, 1 (default) or 2, as the official code.
    """

    uses_gradients = True
    gram_only = True

    def __init__(self, num_tasks: int, alpha: float = 0.5, rescale: int = 1, **kw) -> None:
        super().__init__(num_tasks, **kw)
        if alpha < 0:
            raise ValueError(f"CAGrad: alpha must be >= 0, got {alpha}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2, got {rescale}")
        self.alpha, self.rescale = float(alpha), rescale

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        c, _ = cagrad_coefficients(gram, self.alpha, self.rescale)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
