"""Training diagnostics read from what a step computes anyway: the ``K x K`` Gram matrix of
the per-task gradients that gradient strategies form (task-gradient norms, pairwise cosines,
conflict rate). Accumulated on the device, read only when the trainer logs.

Example:
    >>> import torch
    >>> m = GramMonitor(2)
    >>> _ = m.observe(torch.tensor([[4.0, -2.0], [-2.0, 1.0]]))
    >>> m.read()["conflict"][0][1]
    1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class GramMonitor:
    """Averages over observed steps: task-gradient norms ``[K]``, cosines ``[K, K]`` and the
    conflict rate ``[K, K]`` (share of steps with a negative inner product).

    Use :meth:`wrap` to observe every Gram matrix a strategy computes (as its ``gram_reducer``,
    after any reduction already configured there)."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self._norms: Tensor | None = None
        self._cos: Tensor | None = None
        self._conflict: Tensor | None = None
        self._count = 0

    def observe(self, gram: Tensor) -> Tensor:
        g = gram.detach().to(torch.float64)
        norms = g.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(norms, norms).clamp_min(torch.finfo(g.dtype).tiny)
        cos = g / denom
        conflict = (g < 0).to(torch.float64)
        if self._norms is None:
            self._norms, self._cos, self._conflict = norms, cos, conflict
        else:
            assert self._cos is not None and self._conflict is not None
            self._norms = self._norms + norms
            self._cos = self._cos + cos
            self._conflict = self._conflict + conflict
        self._count += 1
        return gram

    def wrap(self, reducer: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
        """A ``gram_reducer`` that applies ``reducer`` (if any) and observes the result."""

        def observed(gram: Tensor) -> Tensor:
            out = reducer(gram) if reducer is not None else gram
            self.observe(out)
            return out

        return observed

    def read(self, reset: bool = True) -> dict[str, list] | None:
        """Means since the last read (one host read), or ``None`` if nothing was observed."""
        if self._count == 0 or self._norms is None:
            return None
        assert self._cos is not None and self._conflict is not None
        out = {
            "grad_norm": (self._norms / self._count).tolist(),
            "cosine": (self._cos / self._count).tolist(),
            "conflict": (self._conflict / self._count).tolist(),
            "steps": self._count,
        }
        if reset:
            self.reset()
        return out
