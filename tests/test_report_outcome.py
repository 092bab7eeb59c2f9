"""The outcome classes and the noise tolerance of the multi-task report (no Ray, no MLflow)."""

from __future__ import annotations

import numpy as np
import pytest

from mtl.metrics import user_auc
from pipeline.report import Predictions, ReportConfig, ReportError, RunData, classify, paired_bootstrap_uauc
from pipeline.report.build import compare, single_task_baselines
from pipeline.report.outcome import BETTER, EQUAL, WORSE

USERS, ROWS_PER_USER = 300, 20


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a baseline score (weak signal) and users."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(USERS), ROWS_PER_USER)
    labels = (rng.random(len(users)) < 0.3).astype(float)
    base = 1 / (1 + np.exp(-(0.8 * labels + rng.normal(0, 1, len(users)))))
    return labels, base, users


def _sharper(labels: np.ndarray, base: np.ndarray, gain: float, seed: int) -> np.ndarray:
    """``base`` moved towards (gain > 0) or away from (gain < 0) the labels."""
    rng = np.random.default_rng(seed)
    return np.clip(base + gain * (labels - 0.5) + rng.normal(0, 0.01, len(base)), 0, 1)


@pytest.mark.parametrize("verdicts, expected", [
    ({"a": BETTER, "b": BETTER, "c": BETTER}, "well done"),
    ({"a": BETTER, "b": EQUAL, "c": EQUAL}, "good"),
    ({"a": BETTER, "b": WORSE, "c": EQUAL}, "seesaw"),
    ({"a": WORSE, "b": WORSE, "c": WORSE}, "negative transfer"),
    ({"a": EQUAL, "b": EQUAL, "c": EQUAL}, "no difference"),
    ({"a": WORSE, "b": EQUAL, "c": EQUAL}, "some worse"),
    ({"a": BETTER}, "well done"),
    ({"a": WORSE}, "negative transfer"),
])
def test_classify_each_class(verdicts: dict[str, str], expected: str) -> None:
    assert classify(verdicts) == expected


def test_classify_rejects_nothing_and_unknown() -> None:
    with pytest.raises(ValueError, match="no tasks"):
        classify({})
    with pytest.raises(ValueError, match="unknown verdicts"):
        classify({"a": "improved"})


def test_bootstrap_difference_is_the_uauc_difference_and_is_seeded() -> None:
    labels, base, users = _data()
    model = _sharper(labels, base, 0.3, seed=1)
    d = paired_bootstrap_uauc(labels, model, base, users, n_boot=300, seed=7)
    assert d.diff == pytest.approx(user_auc(labels, model, users) - user_auc(labels, base, users), abs=1e-12)
    assert d.low <= d.diff <= d.high
    assert d.users == len({u for u in users if 0 < labels[users == u].sum() < ROWS_PER_USER})
    assert paired_bootstrap_uauc(labels, model, base, users, n_boot=300, seed=7) == d
    assert paired_bootstrap_uauc(labels, model, base, users, n_boot=300, seed=8) != d


def test_clear_differences_are_better_and_worse() -> None:
    labels, base, users = _data()
    assert paired_bootstrap_uauc(labels, _sharper(labels, base, 0.3, 1), base, users, n_boot=300).verdict == BETTER
    assert paired_bootstrap_uauc(labels, _sharper(labels, base, -0.3, 1), base, users, n_boot=300).verdict == WORSE


def test_small_difference_within_the_interval_counts_as_equal() -> None:
    labels, base, users = _data()
    rng = np.random.default_rng(3)
    noisy = np.clip(base + rng.normal(0, 0.03, len(base)), 0, 1)  # the same model, re-noised
    d = paired_bootstrap_uauc(labels, noisy, base, users, n_boot=500)
    assert d.diff != 0  # a real, nonzero difference of the point estimates ...
    assert d.low < 0 < d.high  # ... that the interval does not separate from 0
    assert d.verdict == EQUAL
    # a wider interval (higher level) can only keep it equal; a clear gain stays better at 99%
    assert paired_bootstrap_uauc(labels, noisy, base, users, n_boot=500, level=0.99).verdict == EQUAL
    assert paired_bootstrap_uauc(labels, _sharper(labels, base, 0.3, 1), base, users, level=0.99).verdict == BETTER


def _run(model: str, tasks: list[str], probs: np.ndarray, labels: np.ndarray, users: np.ndarray,
         run_id: str) -> RunData:
    return RunData(run_id=run_id, name=run_id, model=model, strategy="equal", tasks=tasks,
                   metrics={"auc": {}, "uauc": {}, "score": None}, oracle=None,
                   predictions=Predictions(tasks, probs, labels, users, rows=np.arange(len(users))))


def test_model_outcome_with_noise_tolerance() -> None:
    """Task a clearly better, task b re-noised (a small difference): "good", not "seesaw" or
    "well done"; with b clearly worse: "seesaw"."""
    la, ba, users = _data(0)
    lb, bb, _ = _data(1)
    labels, base = np.stack([la, lb], 1), np.stack([ba, bb], 1)
    single = _run("single_task", ["a", "b"], base, labels, users, "single")
    noisy_b = np.clip(bb + np.random.default_rng(3).normal(0, 0.03, len(bb)), 0, 1)
    good = _run("mmoe", ["a", "b"], np.stack([_sharper(la, ba, 0.3, 1), noisy_b], 1), labels, users, "mmoe")
    cfg = ReportConfig(n_boot=300)
    c = compare(good, single_task_baselines([single, good]), cfg)
    assert c.differences["b"].diff != 0 and c.differences["b"].verdict == EQUAL
    assert c.outcome == "good" and c.baseline == {"a": "single", "b": "single"} and c.missing == []
    seesaw = _run("ple", ["a", "b"], np.stack([_sharper(la, ba, 0.3, 1), _sharper(lb, bb, -0.3, 2)], 1), labels, users, "ple")
    assert compare(seesaw, single_task_baselines([single]), cfg).outcome == "seesaw"


def test_tasks_with_too_few_users_are_not_compared() -> None:
    """A bootstrap over a handful of users has an interval of no width: such a task is shown but
    left out of the outcome."""
    labels, base, users = _data()
    single = _run("single_task", ["a"], base[:, None], labels[:, None], users, "single")
    model = _run("mmoe", ["a"], _sharper(labels, base, 0.3, 1)[:, None], labels[:, None], users, "mmoe")
    c = compare(model, single_task_baselines([single]), ReportConfig(n_boot=50, min_users=USERS + 1))
    assert c.outcome is None and c.differences == {} and c.missing == ["a"] and c.too_few["a"].users == USERS - 1
    assert compare(model, single_task_baselines([single]), ReportConfig(n_boot=50, min_users=USERS - 1)).outcome == "well done"


def test_per_task_single_task_runs_are_baselines() -> None:
    """Runs that learnt one task each replace the joint single-task run, task by task; two
    candidates for one task are an error."""
    la, ba, users = _data(0)
    lb, bb, _ = _data(1)
    labels, base = np.stack([la, lb], 1), np.stack([ba, bb], 1)
    joint = _run("single_task", ["a", "b"], base, labels, users, "joint")
    only_a = _run("single_task", ["a"], base[:, :1], labels[:, :1], users, "only_a")
    chosen = single_task_baselines([joint, only_a])
    assert chosen["a"].run_id == "only_a" and chosen["b"].run_id == "joint"
    other_a = _run("single_task", ["a"], base[:, :1], labels[:, :1], users, "other_a")
    with pytest.raises(ReportError, match="could be its baseline"):
        single_task_baselines([joint, only_a, other_a])


def test_runs_on_different_rows_are_refused() -> None:
    labels, base, users = _data()
    single = _run("single_task", ["a"], base[:, None], labels[:, None], users, "single")
    model = _run("mmoe", ["a"], base[:-5, None], labels[:-5, None], users[:-5], "mmoe")
    with pytest.raises(ReportError, match="different validation rows"):
        compare(model, single_task_baselines([single]), ReportConfig(n_boot=10))
