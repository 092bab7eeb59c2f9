"""MGDA / MGDA-UB (Sener & Koltun, NeurIPS 2018).

The update is the min-norm point of the convex hull of the task gradients,
``sum_i w_i g_i`` with ``w = argmin_{w in simplex} ||sum_i w_i g_i||^2`` (solved exactly on the
Gram matrix by face enumeration, see :mod:`mtl.strategies._solvers`). ``mgda`` takes the
gradients of the dense shared parameters; ``mgda_ub`` (the paper's upper bound) takes them
w.r.t. a shared representation (``representation=`` / the driver's ``representation_module``,
e.g. the MMoE experts' output) and applies ``w`` to every shared parameter.

Optional gradient normalisation as in the reference code (``"none"``, ``"l2"``, ``"loss"``,
``"loss+"``): task ``i``'s gradient is divided by ``n_i`` before solving and ``c_i = w_i / n_i``.
Embeddings get the same coefficients. A zero task gradient puts ``0`` in the hull: the update
is zero (a Pareto-stationary point), as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies._solvers import min_norm_simplex
from mtl.strategies.base import Combination, Strategy, normalized_gram, psqrt


class MGDA(Strategy):
    """MGDA with the exact min-norm solver.

    Args:
        num_tasks: ``K``.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
    """

    uses_gradients = True
    gram_only = True

    def __init__(self, num_tasks: int, normalization: str = "none", **kw) -> None:
        super().__init__(num_tasks, **kw)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"MGDA: unknown normalization {normalization!r}")
        self.normalization = normalization

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        g64 = gram.to(torch.float64)
        norms = psqrt(g64.diagonal().clamp_min(0.0))
        st = stats.to(torch.float64)
        if self.normalization == "l2":
            n = norms
        elif self.normalization == "loss":
            n = st
        elif self.normalization == "loss+":
            n = st * norms
        else:
            n = torch.ones_like(norms)
        n = n.clamp_min(1e-30)
        m, _ = normalized_gram(g64 / (n.unsqueeze(0) * n.unsqueeze(1)))
        w = min_norm_simplex(m)
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=(w / n).to(losses.dtype))


class MGDAUB(MGDA):
    """MGDA-UB: MGDA on gradients w.r.t. a shared representation (see the module docstring)."""

    uses_representation = True
