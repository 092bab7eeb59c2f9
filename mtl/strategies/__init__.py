"""Task-balancing strategies: one file each, one registry (:data:`STRATEGIES`), one contract
(:class:`mtl.strategies.base.Strategy`, see its module docstring).

| name | what it does | embeddings get | towers/gates get | cost per step |
| --- | --- | --- | --- | --- |
| ``equal`` / ``static`` | ``sum w_i L_i`` | ``sum w_i grad L_i`` | ``w_i grad L_i`` | plain step |
| ``uncertainty`` | Kendall et al. 2018 | ``exp(-s_i)``-weighted sum | same weight | plain step |
| ``dwa`` | Liu et al. 2019 | weighted sum | same weight | plain step |
| ``famo`` | Liu et al. 2023 | weighted sum | same weight | plain step |
| ``gradnorm`` | Chen et al. 2018 | weighted sum | same weight | per-task grads of the given layer + backward |
| ``dbmtl`` | Lin et al. 2023 | ``sum alpha_i grad log L_i`` (this batch) | ``grad log L_i`` | per-task grads + backward |
| ``pcgrad``, ``gradvac``, ``mgda``, ``cagrad``, ``imtl_g``, ``nash_mtl``, ``aligned_mtl`` | Gram-matrix coefficients ``c`` | ``sum c_i grad L_i`` (``embedding_grad="plain"``: plain sum) | own plain gradient | ``K`` per-task grads over the dense shared params + one backward (``plain``: ``K - 1`` + one) |
| ``mgda_ub`` | MGDA on representation gradients | ``sum c_i grad L_i`` | own plain gradient | ``K`` passes through the task heads + one backward |

``refresh_every=N`` recomputes gradient-based coefficients every ``N`` steps (plain steps in between).

Example:
    >>> s = build_strategy("pcgrad", num_tasks=3, seed=1)
    >>> type(s).__name__, s.uses_gradients
    ('PCGrad', True)
"""

from __future__ import annotations

from typing import Any

from mtl.strategies.aligned import AlignedMTL
from mtl.strategies.base import Combination, NonFiniteLossError, Strategy, task_gradients
from mtl.strategies.cagrad import CAGrad
from mtl.strategies.dbmtl import DBMTL
from mtl.strategies.driver import model_backward, per_task_bce
from mtl.strategies.dwa import DWA
from mtl.strategies.famo import FAMO
from mtl.strategies.gradnorm import GradNorm
from mtl.strategies.gradvac import GradVac
from mtl.strategies.imtl import IMTLG
from mtl.strategies.mgda import MGDA, MGDAUB
from mtl.strategies.nash import NashMTL
from mtl.strategies.pcgrad import PCGrad
from mtl.strategies.static import StaticWeights
from mtl.strategies.uncertainty import UncertaintyWeighting

STRATEGIES: dict[str, type[Strategy]] = {
    "equal": StaticWeights,
    "static": StaticWeights,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "famo": FAMO,
    "gradnorm": GradNorm,
    "dbmtl": DBMTL,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "mgda": MGDA,
    "mgda_ub": MGDAUB,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
}

#: strategies whose shared update is a combination of per-task gradients (Gram coefficients)
GRADIENT_STRATEGIES = ("pcgrad", "gradvac", "mgda", "mgda_ub", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl")


def build_strategy(name: str, num_tasks: int, **kwargs: Any) -> Strategy:
    """Construct a registered strategy by name (keyword arguments go to its constructor;
    every strategy takes ``refresh_every`` and ``check_finite``)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {sorted(STRATEGIES)}") from None
    return cls(num_tasks, **kwargs)


__all__ = [
    "GRADIENT_STRATEGIES",
    "STRATEGIES",
    "Combination",
    "NonFiniteLossError",
    "Strategy",
    "build_strategy",
    "model_backward",
    "per_task_bce",
    "task_gradients",
]
