"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

With learnable ``s_i = log sigma_i^2`` the objective is

- classification (a softmax/sigmoid likelihood scaled by ``1/sigma^2``, the paper's eq. 10
  approximation): ``exp(-s_i) L_i + s_i / 2`` (= ``L_i / sigma^2 + log sigma``);
- regression (Gaussian likelihood): ``exp(-s_i) L_i / 2 + s_i / 2``.

So ``d/ds_i = -exp(-s_i) L_i + 1/2`` (classification) or ``-exp(-s_i) L_i / 2 + 1/2``.

The ``s_i`` are ordinary parameters of this module: the trainer adds ``strategy.parameters()``
to its optimizer (under DDP they are averaged like any parameter, see the DDP notes).
Embeddings and towers get ``exp(-s_i)``-weighted gradients (the weighted objective).
Cost: a plain step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.strategies.base import Combination, Strategy


class UncertaintyWeighting(Strategy):
    """Homoscedastic-uncertainty loss weighting.

    Args:
        num_tasks: ``K``.
        kinds: per task ``"classification"`` (default for all) or ``"regression"``.
        init_log_var: initial ``s_i``.
    """

    def __init__(
        self, num_tasks: int, kinds: Sequence[str] | None = None, init_log_var: float = 0.0, **kw
    ) -> None:
        super().__init__(num_tasks, **kw)
        kinds = list(kinds) if kinds is not None else ["classification"] * num_tasks
        if len(kinds) != num_tasks or any(k not in ("classification", "regression") for k in kinds):
            raise ValueError(f"UncertaintyWeighting: kinds must be {num_tasks} of 'classification'/'regression', got {kinds}")
        self.kinds = kinds
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init_log_var)))
        self.register_buffer("factor", torch.tensor([1.0 if k == "classification" else 0.5 for k in kinds]))

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        s = self.log_vars.to(losses.dtype)
        return Combination(loss_weights=self.factor * torch.exp(-s), extra_loss=0.5 * s.sum())
