"""Static loss weights (equal by default): ``sum_i w_i L_i``.

Embeddings: the plain weighted sum ``sum_i w_i grad L_i``. Cost: one backward (a plain step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl.strategies.base import Combination, Strategy


class StaticWeights(Strategy):
    """Fixed weights ``w`` (default all ones, i.e. the plain sum of the task losses).

    Args:
        num_tasks: ``K``.
        weights: ``K`` non-negative weights; default ones.
    """

    def __init__(self, num_tasks: int, weights: Sequence[float] | None = None, **kw) -> None:
        super().__init__(num_tasks, **kw)
        w = torch.ones(num_tasks) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (num_tasks,):
            raise ValueError(f"StaticWeights: expected {num_tasks} weights, got {list(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"StaticWeights: weights must be finite and non-negative, got {w.tolist()}")
        self.register_buffer("weights", w)

    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        return Combination(loss_weights=self.weights.to(losses.dtype))
