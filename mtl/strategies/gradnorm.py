"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Loss weights ``w`` (sum ``K``). On the shared parameters ``W`` given (the paper: the last
shared layer; :func:`mtl.strategies.model_backward` passes ``model.last_shared_parameters()``
unless told otherwise), ``G_i = ||grad_W w_i L_i|| = w_i n_i``
with ``n_i = sqrt(Gram_ii)``; ``Gbar = mean_i G_i``; inverse training rates
``r_i = Ltilde_i / mean(Ltilde)`` with ``Ltilde_i = L_i(t) / L_i(0)``; the target
``Gbar r_i^alpha`` is a constant. ``L_grad = sum_i |G_i - Gbar r_i^alpha|`` and
``dL_grad/dw_i = sign(w_i n_i - target_i) n_i``; the weights take a gradient step of size
``lr`` and are renormalised to sum to ``K`` (kept ``>= min_weight``). The model step uses the
weights before the update. Losses for ``L(0)`` and the rates are the (all-reducible)
``state_losses``.

Embeddings and towers get the weighted sum ``sum_i w_i grad L_i``. Cost: per-task gradients
over the given layer (only norms are used) + a plain backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy, psqrt


class GradNorm(Strategy):
    """GradNorm.

    Differences from the paper (which updates ``w`` with the network's optimizer): plain
    gradient descent with its own step ``lr`` (0.025, as LibMTL's weight learning rate), and the
    clamp at ``min_weight`` before renormalising (not in the paper; keeps every weight positive).

    Args:
        num_tasks: ``K``.
        alpha: asymmetry (paper: 1.5 for NYUv2).
        lr: step size of the weight update.
        min_weight: lower clamp before renormalisation.
    """

    loss_driven_state = True

    uses_gradients = True
    uses_last_shared_layer = True

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-3, **kw) -> None:
        super().__init__(num_tasks, **kw)
        self.alpha, self.lr, self.min_weight = float(alpha), float(lr), float(min_weight)
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.ones(num_tasks))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def target_and_grad(self, stats: Tensor, gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(G, target, dL_grad/dw)`` for the current weights."""
        l0 = torch.where(self.initialized, self.initial_losses, stats)
        norms = psqrt(gram.diagonal().clamp_min(0.0)).to(self.weights.dtype)
        g = self.weights * norms
        ltilde = stats / l0.clamp_min(1e-12)
        rate = ltilde / ltilde.mean().clamp_min(1e-12)
        target = g.mean() * rate.pow(self.alpha)
        return g, target, torch.sign(g - target) * norms

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        assert gram is not None
        stats = stats.to(self.weights.dtype)
        _, _, dw = self.target_and_grad(stats, gram)
        self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, stats))
        self.initialized.fill_(True)
        used = self.weights.clone()
        new = (self.weights - self.lr * dw).clamp_min(self.min_weight)
        self.weights.copy_(self.num_tasks * new / new.sum())
        return Combination(loss_weights=used.to(losses.dtype))

    def reuse(self, cached: Combination, losses: Tensor, stats: Tensor) -> Combination:
        return Combination(loss_weights=self.weights.to(losses.dtype))
