"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023).

With the Gram matrix ``M = G G^T = V Lambda V^T`` (eigenvalues above
``max(Lambda) K eps_float32`` kept, as the reference code), ``B = sigma_min V Lambda^{-1/2} V^T``
(``sigma_min^2`` the smallest kept eigenvalue) makes the aligned gradients ``B G`` orthogonal
with equal norms ``sigma_min`` (condition number 1); the update is their sum
``(B G)^T 1 = sum_i c_i g_i`` with ``c = B 1`` (task weights ones). Embeddings get the same
coefficients. Zero or dependent task gradients are handled by the rank cut.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy, normalized_gram


def aligned_matrix(gram: Tensor) -> Tensor:
    """``B`` (float64, ``[K, K]``) for the Gram matrix."""
    m, s = normalized_gram(gram)
    lam, v = torch.linalg.eigh(m)
    k = m.shape[0]
    tol = lam.max() * k * torch.finfo(torch.float32).eps
    keep = lam > tol
    inv_sqrt = torch.where(keep, 1.0 / torch.sqrt(lam.clamp_min(1e-300)), torch.zeros_like(lam))
    lam_min = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
    lam_min = torch.where(torch.isfinite(lam_min), lam_min, torch.zeros_like(lam_min))
    # B for the unnormalised Gram: sigma_min and Lambda^{-1/2} scale by sqrt(s) and 1/sqrt(s).
    return torch.sqrt(lam_min) * (v * inv_sqrt.unsqueeze(0)) @ v.t()


class AlignedMTL(Strategy):
    """Aligned-MTL (equal task weights)."""

    uses_gradients = True

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        c = aligned_matrix(gram).sum(0)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
