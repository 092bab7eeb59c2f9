"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021).

Per ordered task pair an EMA target ``phi_hat_ij`` of the cosine similarity (initial 0). For each
task ``i``, in a random order over ``j != i``: with ``phi = cos(g_i^PC, g_j)``, if
``phi < phi_hat_ij``:
``g_i^PC += ||g_i^PC|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j``
(which makes ``cos(g_i^PC, g_j) = phi_hat`` exactly); then
``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi`` (with ``phi`` before the adjustment, as
LibMTL's reference implementation). The update is ``sum_i g_i^PC``. The similarity is taken
over the whole dense shared vector (one granularity). Tracked on the Gram matrix like PCGrad.

Embeddings get the same coefficients. Pairs with a zero gradient are skipped (no adjustment,
no EMA update). Under ordering 1 (per-rank Gram) the targets would drift between ranks:
use ordering 2 (``grad_reducer``) with GradVac under data parallelism.
"""

from __future__ import annotations


import torch
from torch import Tensor

from mtl.device import host_to_device
from mtl.strategies.base import Combination, SeededStrategy, psqrt
from mtl.strategies.pcgrad import random_orders


def gradvac_coefficients(gram: Tensor, targets: Tensor, orders: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(c, new_targets)`` for one GradVac step on the Gram matrix."""
    a, tgt = gradvac_rows(gram, targets, orders, beta)
    return a.sum(0), tgt


def gradvac_rows(gram: Tensor, targets: Tensor, orders: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(A, new_targets)`` with ``g_i^PC = sum_k A_ik g_k`` (float64)."""
    k = gram.shape[0]
    m = gram.to(torch.float64)
    tgt = targets.to(torch.float64).clone()
    tiny = 1e-30
    norm = psqrt(m.diagonal().clamp_min(0.0))
    a = torch.eye(k, dtype=m.dtype, device=m.device)
    rows = torch.arange(k, device=m.device)
    orders = host_to_device(orders, m.device)
    for s in range(k - 1):
        j = orders[:, s]
        am = a @ m
        dots = am.gather(1, j.view(k, 1)).squeeze(1)
        norm_pc = psqrt((am * a).sum(1).clamp_min(0.0))
        norm_j = norm[j]
        valid = (norm_pc > 1e-15 * norm.max()) & (norm_j > 1e-15 * norm.max())
        phi = (dots / (norm_pc * norm_j).clamp_min(tiny)).clamp(-1.0, 1.0)
        phi_hat = tgt[rows, j]
        root_hat = psqrt((1.0 - phi_hat * phi_hat).clamp_min(1e-12))
        w = norm_pc * (phi_hat * psqrt((1.0 - phi * phi).clamp_min(0.0)) - phi * root_hat) / (norm_j.clamp_min(tiny) * root_hat)
        w = torch.where(valid & (phi < phi_hat), w, torch.zeros_like(w))
        a[rows, j] = a[rows, j] + w
        tgt[rows, j] = torch.where(valid, (1.0 - beta) * phi_hat + beta * phi, phi_hat)
    return a, tgt


class GradVac(SeededStrategy):
    """Gradient Vaccine.

    Args:
        num_tasks: ``K``.
        beta: EMA constant of the similarity targets.
        seed: seed of the generator of the task orders.
    """

    uses_gradients = True
    gram_only = True

    def __init__(self, num_tasks: int, beta: float = 0.01, seed: int = 0, **kw) -> None:
        super().__init__(num_tasks, seed=seed, **kw)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.register_buffer("targets", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        c, tgt = gradvac_coefficients(gram, self.targets, random_orders(self.num_tasks, self.generator), self.beta)
        self.targets.copy_(tgt.to(self.targets.device))
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
