"""A multi-task model against the single-task baseline, task by task, with a stated tolerance
for noise: the paired bootstrap over users of the uAUC difference.

uAUC is the mean of per-user AUCs over the users whose labels hold both classes, so the
difference of two models' uAUC on the same rows is the mean of per-user differences ``d_u``.
Resampling users with replacement and taking the mean of ``d_u`` each time gives the bootstrap
distribution of the difference; a task counts as *better* (or *worse*) only when the
percentile interval lies wholly above (below) 0, and as *equal* otherwise.

The model's outcome over its tasks, in the classes of the PLE paper (Tang et al., RecSys 2020)
plus two for the cases those four leave out:

- every task better: ``well done``;
- none worse and some better: ``good``;
- some better and some worse: ``seesaw``;
- every task worse: ``negative transfer``;
- none better and none worse (all within noise): ``no difference``;
- none better, some (not all) worse: ``some worse``.

Example:
    >>> # diff = paired_bootstrap_uauc(labels, mtl_probs, single_probs, users, n_boot=1000, seed=0)
    >>> # classify({"like": diff.verdict, ...})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mtl.metrics import per_user_auc

BETTER, WORSE, EQUAL = "better", "worse", "equal"
WELL_DONE, GOOD, SEESAW, NEGATIVE = "well done", "good", "seesaw", "negative transfer"
NO_DIFFERENCE, SOME_WORSE = "no difference", "some worse"
OUTCOMES = (WELL_DONE, GOOD, SEESAW, NEGATIVE, NO_DIFFERENCE, SOME_WORSE)

#: resampled users per chunk of bootstrap draws (bounds the index matrix to ~160 MB)
_CHUNK_CELLS = 20_000_000


@dataclass(frozen=True)
class TaskDifference:
    """uAUC(model) - uAUC(baseline) on one task and its bootstrap interval over users."""

    diff: float
    low: float
    high: float
    users: int  # users with both classes (the ones uAUC averages over)

    @property
    def verdict(self) -> str:
        """``better``/``worse`` when the interval excludes 0, ``equal`` otherwise."""
        if self.low > 0:
            return BETTER
        if self.high < 0:
            return WORSE
        return EQUAL


def paired_bootstrap_uauc(labels: np.ndarray, probs: np.ndarray, base_probs: np.ndarray, users: np.ndarray,
                          n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> TaskDifference:
    """The paired bootstrap over users of ``uAUC(probs) - uAUC(base_probs)`` on the same rows.

    Args:
        labels, probs, base_probs, users: ``[N]`` each, row ``i`` the same event for both models.
        n_boot: bootstrap resamples of the users.
        level: coverage of the percentile interval.
        seed: the resampling generator's seed (the same seed gives the same interval).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    ids, model_auc = per_user_auc(labels, probs, users)
    base_ids, base_auc = per_user_auc(labels, base_probs, users)
    assert np.array_equal(ids, base_ids)  # which users count depends on the labels only
    d = model_auc - base_auc
    n = len(d)
    if n == 0:
        return TaskDifference(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return TaskDifference(float(d.mean()), float(low), float(high), n)


def classify(verdicts: Mapping[str, str]) -> str:
    """The outcome class (module docstring) of per-task verdicts ``{task: better|worse|equal}``."""
    if not verdicts:
        raise ValueError("classify: no tasks to compare")
    unknown = set(verdicts.values()) - {BETTER, WORSE, EQUAL}
    if unknown:
        raise ValueError(f"classify: unknown verdicts {sorted(unknown)}")
    values = list(verdicts.values())
    better, worse = values.count(BETTER), values.count(WORSE)
    if better == len(values):
        return WELL_DONE
    if worse == len(values):
        return NEGATIVE
    if better and worse:
        return SEESAW
    if better:
        return GOOD
    return SOME_WORSE if worse else NO_DIFFERENCE
