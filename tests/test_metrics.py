"""The metrics equal the official WeChat 2021 scorer (re-stated literally below)."""

from collections import defaultdict

import numpy as np
import pytest
from scipy.stats import rankdata

from mtl.fusion import fuse
from mtl.metrics import auc, user_auc, wechat_score, weighted_score


def _roc_auc_reference(y, p):
    # sklearn.metrics.roc_auc_score's value: Mann-Whitney U with average ranks.
    y = np.asarray(y)
    r = rankdata(p)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return (r[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _official_uauc(labels, preds, user_id_list):
    """The organisers' evaluation.py uAUC, loop for loop (roc_auc_score replaced above)."""
    user_pred, user_truth = defaultdict(list), defaultdict(list)
    for idx, truth in enumerate(labels):
        user_pred[user_id_list[idx]].append(preds[idx])
        user_truth[user_id_list[idx]].append(truth)
    total, size = 0.0, 0.0
    for user_id in set(user_id_list):
        truths = user_truth[user_id]
        if any(truths[i] != truths[i + 1] for i in range(len(truths) - 1)):
            total += _roc_auc_reference(np.asarray(truths), np.asarray(user_pred[user_id]))
            size += 1.0
    return total / size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_auc_equals_official_scorer_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 150, n)
    labels = (rng.random(n) < 0.15).astype(int)
    # coarse predictions create many ties; the official pipeline rounds to 6 decimals
    preds = np.round(rng.random(n) * 0.3 + 0.2 * labels, 2) + rng.random(n) * 1e-8
    expected = _official_uauc(labels, np.round(preds, 6), users.tolist())
    assert user_auc(labels, preds, users) == pytest.approx(expected, abs=1e-12)


def test_user_auc_skips_single_class_users_and_rounds():
    labels = np.array([1, 0, 1, 1, 0, 0])
    users = np.array([1, 1, 2, 2, 3, 3])
    preds = np.array([0.7, 0.3, 0.5, 0.1, 0.2, 0.9])
    assert user_auc(labels, preds, users) == 1.0  # only user 1 counts
    # a difference below 1e-6 is a tie after rounding: AUC 0.5
    assert user_auc(np.array([1, 0]), np.array([0.30000001, 0.3]), np.array([5, 5])) == 0.5
    assert user_auc(np.array([1, 0]), np.array([0.30000001, 0.3]), np.array([5, 5]), decimals=None) == 1.0


def test_auc_matches_rank_formula_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.3).astype(int)
    p = rng.random(500) + 0.5 * y
    assert auc(y, p) == pytest.approx(_roc_auc_reference(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        auc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


def test_weighted_score_is_official_formula():
    scores = {"read_comment": 0.6, "like": 0.62, "click_avatar": 0.7, "forward": 0.68}
    expected = round((4 * 0.6 + 3 * 0.62 + 2 * 0.7 + 1 * 0.68) / 10, 6)
    assert weighted_score(scores) == expected
    rng = np.random.default_rng(0)
    n = 2000
    users = rng.integers(0, 50, n)
    y = (rng.random((n, 2)) < 0.2).astype(int)
    p = rng.random((n, 2)) + 0.3 * y
    score, per = wechat_score(y, p, users, actions=["read_comment", "like"])
    assert per["like"] == pytest.approx(_official_uauc(y[:, 1], np.round(p[:, 1], 6), users.tolist()))
    assert score == round((4 * per["read_comment"] + 3 * per["like"]) / 7, 6)


def test_fusion_methods():
    p = np.array([[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]])
    assert fuse(p, [1, 0], "weighted_sum").tolist() == [0.1, 0.5, 0.9]
    np.testing.assert_allclose(fuse(p, [1, 1], "weighted_product"), [0.09, 0.25, 0.09])
    np.testing.assert_allclose(fuse(p, [1, 0], "weighted_rank"), np.array([1, 2, 3]) / 3)
    # product fusion is invariant (in ranking) to a power transform of one task
    q = p.copy()
    q[:, 0] = q[:, 0] ** 3
    assert (np.argsort(fuse(p, [3, 1], "weighted_product")) == np.argsort(fuse(q, [1, 1], "weighted_product"))).all()
    with pytest.raises(ValueError, match="non-negative"):
        fuse(p, [-1, 1])
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(p, [1, 1], "nope")
