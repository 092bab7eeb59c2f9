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


# ------------------------------------------------------------------ edge cases (mutation testing, issue 15)


def test_float32_predictions_are_rounded_as_their_float64_values():
    """0.12345651 and 0.1234565 (float32) both round to 0.123457 in float64 (a tie: AUC 0.5);
    rounding in float32 would split them (0.123457 vs 0.123456)."""
    preds = np.array([0.12345651, 0.1234565], dtype=np.float32)
    assert user_auc(np.array([1, 0]), preds, np.array([1, 1])) == 0.5
    assert auc(np.array([1, 0]), preds, decimals=6) == 0.5
    assert auc(np.array([1, 0]), preds) == 1.0  # auc's default: no rounding


def test_ties_do_not_join_across_users():
    """User 1's largest prediction equals user 2's smallest: ranks are per user."""
    labels = np.array([0, 1, 1, 0, 1])
    preds = np.array([0.1, 0.5, 0.5, 0.9, 0.95])
    users = np.array([1, 1, 2, 2, 2])
    expected = _official_uauc(labels, preds, users.tolist())  # user 1: 1.0, user 2: 0.5
    assert expected == 0.75
    assert user_auc(labels, preds, users) == expected


def test_user_auc_defaults_to_six_decimals_and_nan_without_both_classes():
    # differ at the 7th decimal: a tie under the official rounding
    assert user_auc(np.array([1, 0]), np.array([0.2000004, 0.2]), np.array([3, 3])) == 0.5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        assert np.isnan(user_auc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2])))
        assert np.isnan(user_auc(np.array([], dtype=int), np.array([]), np.array([], dtype=int)))


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"labels \(3,\) and preds \(4,\) must be equal 1-d shapes"):
        user_auc(np.array([0, 1, 0]), np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        auc(np.zeros((2, 2)), np.zeros((2, 2)))
    nan_rows = np.zeros(13)
    nan_rows[[1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]] = np.nan
    with pytest.raises(ValueError, match=r"NaN at rows \[1, 3, 4, 5, 6, 7, 8, 9, 10, 11\]$"):
        auc(np.array([0, 1] * 6 + [0]), nan_rows)
    bad = np.array([0, 1, 2, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])  # 11 bad rows: the first 10 named
    with pytest.raises(ValueError, match=r"rows \[2, 4, 5, 6, 7, 8, 9, 10, 11, 12\] are not$"):
        auc(bad, np.arange(14.0))
    with pytest.raises(ValueError, match="^AUC is undefined: labels contain only one class$"):
        auc(np.ones(3), np.arange(3.0))
    with pytest.raises(KeyError, match=r"no weight for actions \['ctr'\]"):
        weighted_score({"like": 0.5, "ctr": 0.6})
    with pytest.raises(ValueError, match="^actions must name the columns of array inputs$"):
        wechat_score(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2))


def test_wechat_score_dict_inputs_and_custom_weights():
    rng = np.random.default_rng(5)
    users = rng.integers(0, 20, 400)
    y = {"like": (rng.random(400) < 0.3).astype(int), "forward": (rng.random(400) < 0.3).astype(int)}
    p = {a: np.round(rng.random(400) + 0.3 * y[a], 6) for a in y}
    u = {a: _official_uauc(y[a], p[a], users.tolist()) for a in y}
    score, per = wechat_score(y, p, users)  # actions default to the dict's keys
    assert per == pytest.approx(u, abs=1e-12)
    assert score == round((3 * u["like"] + u["forward"]) / 4, 6)
    score2, _ = wechat_score(y, p, users, actions=["forward"], weights={"forward": 2.0, "like": 0.0})
    assert score2 == round(u["forward"], 6)
    score3, _ = wechat_score(y, p, users, weights={"like": 1.0, "forward": 3.0})
    assert score3 == round((u["like"] + 3 * u["forward"]) / 4, 6)
