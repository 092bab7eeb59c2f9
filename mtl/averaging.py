"""Weight averaging over the optimizer steps: an exponential moving average (EMA) or the plain
mean (SWA, Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018) of a model's parameters, kept in a copy of the model that is
evaluated, early-stopped on and saved instead of the last weights (a lower-variance model of
the same training run).

Built on :class:`torch.optim.swa_utils.AveragedModel`: after each update ``t = 1, 2, ...``
(the steps after ``start_step``)

- ``ema``: ``avg_1 = p_1``, ``avg_t = decay * avg_{t-1} + (1 - decay) * p_t``
  (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`);
- ``swa``: ``avg_t = (p_1 + ... + p_t) / t`` (:func:`torch.optim.swa_utils.get_swa_multi_avg_fn`).

Buffers are copied, not averaged (integer buffers cannot be). In data-parallel training every
rank's parameters are equal after each step, so every rank's average is equal too.

Example:
    >>> net = torch.nn.Linear(1, 1, bias=False)
    >>> avg = WeightAverage(net, "ema", decay=0.5)
    >>> for w in (1.0, 3.0):
    ...     _ = net.weight.data.fill_(w); avg.update(net)
    >>> avg.module.weight.item()  # 0.5 * 1 + 0.5 * 3
    2.0
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

AVERAGE_KINDS = ("ema", "swa")


class WeightAverage:
    """The running average of ``model``'s parameters (a deep copy of the model holds it).

    Args:
        model: the model being trained (copied once here; the copy is on the model's device).
        kind: ``"ema"`` or ``"swa"`` (see the module docstring).
        decay: the EMA's decay (ignored by ``swa``).
        start_step: :meth:`update` with ``step <= start_step`` does nothing (e.g. SWA over the
            later part of a run); until the first counted update :meth:`model_or` returns the
            live model.
    """

    def __init__(self, model: nn.Module, kind: Literal["ema", "swa"] = "ema", decay: float = 0.999,
                 start_step: int = 0) -> None:
        if kind not in AVERAGE_KINDS:
            raise ValueError(f"weight average kind {kind!r} unknown; known: {list(AVERAGE_KINDS)}")
        if kind == "ema" and not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        avg_fn = get_ema_multi_avg_fn(decay) if kind == "ema" else get_swa_multi_avg_fn()
        self.kind, self.decay, self.start_step = kind, float(decay), int(start_step)
        self.averaged = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=False)
        self.averaged.requires_grad_(False)
        self._updates = 0  # host copy of averaged.n_averaged (no device read per evaluation)

    @property
    def module(self) -> nn.Module:
        """The model holding the averaged parameters."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """How many updates the average holds."""
        return self._updates

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average in ``model``'s current parameters (skipped while ``step <= start_step``)."""
        if step is not None and step <= self.start_step:
            return
        self.averaged.update_parameters(model)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self._updates += 1

    def model_or(self, live: nn.Module) -> nn.Module:
        """The averaged model once it holds an update, else ``live``."""
        return self.module if self._updates > 0 else live

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self._updates = int(self.averaged.n_averaged)
