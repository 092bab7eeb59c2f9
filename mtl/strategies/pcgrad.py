"""PCGrad: gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020).

For each task ``i``, in a random order over ``j != i``: if ``g_i^PC . g_j < 0`` then
``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``; the update is ``sum_i g_i^PC`` (Algorithm 1; the
order is drawn independently for each ``i``). Each ``g_i^PC`` stays a combination
``sum_k A_ik g_k`` of the raw gradients, tracked on the Gram matrix, so the update is
``sum_k c_k g_k`` with ``c = 1^T A``. The order comes from a seeded ``torch.Generator`` in the
strategy state (identical on every rank).

Embeddings get ``sum_k c_k grad_emb L_k`` (the same coefficients, through ``task_grad_scale``).
A zero task gradient is never projected against and contributes nothing.
Cost: ``K`` per-task gradient calls over the dense shared parameters + one backward.
"""

from __future__ import annotations


import torch
from torch import Tensor

from mtl.device import host_to_device
from mtl.strategies.base import Combination, SeededStrategy


def random_orders(k: int, generator: torch.Generator) -> Tensor:
    """``[K, K-1]`` int64: row ``i`` is a uniformly random order of ``{j != i}``."""
    keys = torch.rand(k, k, generator=generator)
    keys.fill_diagonal_(2.0)  # self goes last, then dropped
    return keys.argsort(dim=1)[:, : k - 1]


def pcgrad_coefficients(gram: Tensor, orders: Tensor) -> Tensor:
    """``c`` with ``sum_i g_i^PC = sum_k c_k g_k`` for the projection orders ``orders``."""
    return pcgrad_rows(gram, orders).sum(0)


def pcgrad_rows(gram: Tensor, orders: Tensor) -> Tensor:
    """``A`` ``[K, K]`` (float64) with ``g_i^PC = sum_k A_ik g_k``."""
    k = gram.shape[0]
    m = gram.to(torch.float64)
    sq = m.diagonal().clamp_min(torch.finfo(m.dtype).tiny)
    a = torch.eye(k, dtype=m.dtype, device=m.device)
    rows = torch.arange(k, device=m.device)
    orders = host_to_device(orders, m.device)
    for s in range(k - 1):
        j = orders[:, s]
        dots = (a @ m).gather(1, j.view(k, 1)).squeeze(1)  # g_i^PC . g_j
        coef = dots.clamp(max=0.0) / sq[j]
        a[rows, j] = a[rows, j] - coef
    return a


class PCGrad(SeededStrategy):
    """PCGrad.

    Args:
        num_tasks: ``K``.
        seed: seed of the generator of the projection orders.
    """

    uses_gradients = True
    gram_only = True

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        c = pcgrad_coefficients(gram, random_orders(self.num_tasks, self.generator))
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=c.to(losses.dtype))
