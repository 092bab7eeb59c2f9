"""Ranking metrics: AUC, per-user AUC (uAUC) and the WeChat 2021 challenge's weighted score.

All functions are vectorised numpy (one sort per call, no Python loop over users) and equal
the official scorer: AUC is the Mann-Whitney statistic with average ranks for ties; uAUC is the
mean over users whose labels contain both classes; predictions are rounded to 6 decimals
before scoring (``decimals=None`` disables it); the weighted score is rounded to 6 decimals.

Example:
    >>> import numpy as np
    >>> user_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.8, 0.2]), np.array([7, 7, 8, 8]))
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Official action weights of the WeChat 2021 challenge (final round; the preliminary round
#: scores the first four).
WECHAT_ACTION_WEIGHTS: dict[str, float] = {
    "read_comment": 4.0,
    "like": 3.0,
    "click_avatar": 2.0,
    "forward": 1.0,
    "favorite": 1.0,
    "comment": 1.0,
    "follow": 1.0,
}
PRELIMINARY_ACTIONS = ("read_comment", "like", "click_avatar", "forward")


def _prepare(labels: np.ndarray, preds: np.ndarray, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    preds = np.asarray(preds, dtype=np.float64)
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must be equal 1-d shapes")
    if np.isnan(preds).any():
        raise ValueError(f"predictions contain NaN at rows {np.flatnonzero(np.isnan(preds))[:10].tolist()}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0/1; rows {np.flatnonzero(bad)[:10].tolist()} are not")
    if decimals is not None:
        preds = np.round(preds, decimals)
    return labels.astype(np.int64), preds


def _grouped_average_ranks(groups: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by (group, pred); return the sort order and each sorted row's 1-based average rank
    within its group (ties share the mean of their positions)."""
    order = np.lexsort((preds, groups))
    g, p = groups[order], preds[order]
    n = len(order)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= p[1:] != p[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    pos_in_group = np.arange(n) - group_start + 1  # 1-based position
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.append(tie_first[1:], n) - 1
    avg = (pos_in_group[tie_first] + pos_in_group[tie_last]) / 2.0
    return order, avg[tie_id]


def _per_group_auc(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC of every group with both classes; returns ``(group_ids, aucs)``."""
    if len(labels) == 0:  # no rows, no group
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    _, group_codes = np.unique(groups, return_inverse=True)
    order, ranks = _grouped_average_ranks(group_codes, preds)
    y = labels[order]
    codes = group_codes[order]
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    n_pos = np.bincount(codes, weights=y, minlength=n_groups)
    n_all = np.bincount(codes, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum_pos = np.bincount(codes, weights=ranks * y, minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    return np.flatnonzero(valid), auc


def auc(labels: np.ndarray, preds: np.ndarray, decimals: int | None = None) -> float:
    """Whole-set ROC AUC (Mann-Whitney, average ranks for ties).

    Raises ``ValueError`` if only one class is present."""
    labels, preds = _prepare(labels, preds, decimals)
    _, aucs = _per_group_auc(labels, preds, np.zeros(len(labels), dtype=np.int64))
    if len(aucs) == 0:
        raise ValueError("AUC is undefined: labels contain only one class")
    return float(aucs[0])


def user_auc(labels: np.ndarray, preds: np.ndarray, users: np.ndarray, decimals: int | None = 6) -> float:
    """Mean AUC over users whose labels contain both 0 and 1 (the official uAUC).

    Args:
        labels: 0/1 labels ``[N]``.
        preds: scores ``[N]``.
        users: user ids ``[N]`` (any sortable dtype).
        decimals: round predictions to this many decimals first (the official scorer uses 6).

    Returns ``nan`` when no user has both classes."""
    _, aucs = per_user_auc(labels, preds, users, decimals)
    return float(aucs.mean()) if len(aucs) else float("nan")


def per_user_auc(labels: np.ndarray, preds: np.ndarray, users: np.ndarray,
                 decimals: int | None = 6) -> tuple[np.ndarray, np.ndarray]:
    """The AUC of every user whose labels contain both classes: ``(user_ids, aucs)``, sorted by
    user id; their mean is :func:`user_auc` (arguments as there)."""
    labels, preds = _prepare(labels, preds, decimals)
    users = np.asarray(users)
    ids, aucs = _per_group_auc(labels, preds, users)
    return np.unique(users)[ids], aucs


def weighted_score(
    scores: Mapping[str, float], weights: Mapping[str, float] = WECHAT_ACTION_WEIGHTS
) -> float:
    """The challenge score ``sum_a w_a * uAUC_a / sum_a w_a`` over the actions in ``scores``,
    rounded to 6 decimals."""
    missing = [a for a in scores if a not in weights]
    if missing:
        raise KeyError(f"no weight for actions {missing}")
    total = sum(float(weights[a]) * float(s) for a, s in scores.items())
    return round(total / sum(float(weights[a]) for a in scores), 6)


def wechat_score(
    labels: Mapping[str, np.ndarray] | np.ndarray,
    preds: Mapping[str, np.ndarray] | np.ndarray,
    users: np.ndarray,
    actions: Sequence[str] | None = None,
    weights: Mapping[str, float] = WECHAT_ACTION_WEIGHTS,
) -> tuple[float, dict[str, float]]:
    """Per-action uAUC and the weighted score, like the official evaluation.

    Args:
        labels / preds: dicts action -> ``[N]``, or ``[N, K]`` arrays with ``actions`` naming
            the columns.
        users: user ids ``[N]``.
        actions: column names for array inputs (default: the keys of ``labels``).

    Returns ``(score, {action: uAUC})``.
    """
    if not isinstance(labels, Mapping):
        if actions is None:
            raise ValueError("actions must name the columns of array inputs")
        labels = {a: np.asarray(labels)[:, i] for i, a in enumerate(actions)}
        preds = {a: np.asarray(preds)[:, i] for i, a in enumerate(actions)}
    assert isinstance(preds, Mapping)
    per_action = {a: user_auc(labels[a], preds[a], users) for a in (actions or list(labels))}
    return weighted_score(per_action, weights), per_action
