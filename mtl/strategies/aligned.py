"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023).

With the Gram matrix ``M = G G^T = V Lambda V^T`` (eigenvalues above
``max(Lambda) K eps_float32`` kept, as the reference code), ``B = sigma_min V Lambda^{-1/2} V^T``
(``sigma_min^2`` the smallest kept eigenvalue) makes the aligned gradients ``B G`` orthogonal
with equal norms ``sigma_min`` (condition number 1; ``scale_mode`` picks another scale as in
the official code); the update is their sum
``(B G)^T 1 = sum_i c_i g_i`` with ``c = B 1`` (task weights ones). Embeddings get the same
coefficients. Zero or dependent task gradients are handled by the rank cut.
``torch.linalg.eigh`` checks its result for errors, which on CUDA reads one flag from the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy, normalized_gram, psqrt


def aligned_matrix(gram: Tensor, scale_mode: str = "min") -> Tensor:
    """``B`` (float64, ``[K, K]``) for the Gram matrix; ``scale_mode`` as the official code:
    ``"min"`` (``sigma_min``, the paper), ``"median"`` or ``"rmse"`` (root of the mean eigenvalue)."""
    m, s = normalized_gram(gram)
    lam, v = torch.linalg.eigh(m)
    k = m.shape[0]
    tol = lam.max() * k * torch.finfo(torch.float32).eps
    keep = lam > tol
    inv_sqrt = torch.where(keep, 1.0 / psqrt(lam.clamp_min(1e-300)), torch.zeros_like(lam))
    lam_min = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
    lam_min = torch.where(torch.isfinite(lam_min), lam_min, torch.zeros_like(lam_min))
    if scale_mode == "median":
        kept = torch.where(keep, lam, torch.full_like(lam, float("nan")))
        lam_min = torch.nanmedian(kept)
    elif scale_mode == "rmse":
        lam_min = (lam * keep).sum() / keep.sum().clamp_min(1)
    # B for the unnormalised Gram: sigma_min and Lambda^{-1/2} scale by sqrt(s) and 1/sqrt(s).
    return psqrt(lam_min) * (v * inv_sqrt.unsqueeze(0)) @ v.t()


class AlignedMTL(Strategy):
    """Aligned-MTL (equal task weights).

    Args:
        num_tasks: ``K``.
        scale_mode: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"`` (official code).
    """

    uses_gradients = True
    gram_only = True

    def __init__(self, num_tasks: int, scale_mode: str = "min", **kw) -> None:
        super().__init__(num_tasks, **kw)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"AlignedMTL: unknown scale_mode {scale_mode!r}")
        self.scale_mode = scale_mode

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        c = aligned_matrix(gram, self.scale_mode).sum(0)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
