"""Fusion-weight search (``python -m pipeline fuse``): the business objective, floors, the
predictions file, and a Tune search that recovers the optimum of a constructed case.

The constructed case: every action's label is a threshold of one hidden score
``s* = sum_k w*_k log p_k``. The weighted product with weights ``w*`` (or any multiple) ranks
rows exactly by ``s*``, so every action's uAUC is 1 there and below 1 in any other direction:
the optimum of the objective is ``w*`` (normalised), whatever the business weights."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.fuse import FuseConfig, evaluate_weights, load_predictions, run_fusion, save_predictions
from pipeline.valid_predictions import Predictions

REPO = Path(__file__).resolve().parents[1]
TASKS = ["read_comment", "like", "click_avatar"]
W_STAR = np.array([0.6, 0.3, 0.1])


def constructed(n: int = 6000, users: int = 60, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.02, 0.98, (n, len(TASKS)))
    hidden = np.log(probs) @ W_STAR
    labels = np.stack([(hidden > np.quantile(hidden, q)).astype(np.float64) for q in (0.5, 0.7, 0.85)], axis=1)
    return Predictions(TASKS, probs, labels, rng.integers(0, users, n), np.arange(n))


def config(**kw: object) -> FuseConfig:
    base = {"business_weights": {"read_comment": 4, "like": 3, "click_avatar": 2},
            "search": {"num_samples": 60, "max_concurrent": 2, "seed": 0}, "cpus_per_trial": 0.5, "sweep_points": 5}
    return FuseConfig.model_validate({**base, **kw})


def test_objective_is_the_business_weighted_uauc_of_the_fused_score() -> None:
    preds = constructed()
    at_optimum = evaluate_weights(preds, 10 * W_STAR, config())  # any multiple ranks the same
    assert at_optimum["objective"] == pytest.approx(1.0)
    one_task = evaluate_weights(preds, [1.0, 0.0, 0.0], config())
    uaucs = [one_task[f"uauc/{t}"] for t in TASKS]
    assert all(u < 0.99 for u in uaucs)
    assert one_task["objective"] == pytest.approx((4 * uaucs[0] + 3 * uaucs[1] + 2 * uaucs[2]) / 9, abs=1e-6)


def test_a_floor_makes_a_trial_infeasible_and_costs_its_shortfall() -> None:
    preds = constructed()
    m = evaluate_weights(preds, [1.0, 0.0, 0.0], config())
    floor = m["uauc/click_avatar"] + 0.05
    cfg = config(floors={"click_avatar": floor}, penalty=10.0)
    f = evaluate_weights(preds, [1.0, 0.0, 0.0], cfg)
    assert f["feasible"] == 0.0 and f["shortfall"] == pytest.approx(0.05)
    assert f["score"] == pytest.approx(f["objective"] - 0.5)
    assert evaluate_weights(preds, W_STAR, cfg)["feasible"] == 1.0


def test_predictions_file_round_trip_one_layout_for_fuse_and_report(tmp_path: Path) -> None:
    """The fusion search's file is the report's artifact layout; files in the search's earlier
    layout still load; a bad file names the missing column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.report import Predictions as ReportPredictions

    preds = constructed(n=50)
    path = save_predictions(preds, tmp_path / "p.parquet")
    back = load_predictions(path)
    assert back.tasks == TASKS
    np.testing.assert_array_equal(back.probs, preds.probs)
    np.testing.assert_array_equal(back.labels, preds.labels)
    np.testing.assert_array_equal(back.users, preds.users)
    np.testing.assert_array_equal(back.rows, preds.rows)
    table = pq.read_table(path)
    assert table.column_names[:4] == ["user", "row", "prob_read_comment", "label_read_comment"]
    report = ReportPredictions.from_table(table)  # what the report reads from a run's artifact
    np.testing.assert_array_equal(report.task("like")[0], preds.probs[:, 1])
    legacy = {"_user": preds.users, "_row": preds.rows, **{f"p_{t}": preds.probs[:, k] for k, t in enumerate(TASKS)},
              **{f"y_{t}": preds.labels[:, k] for k, t in enumerate(TASKS)}}
    pq.write_table(pa.table(legacy), tmp_path / "legacy.parquet")
    old = load_predictions(tmp_path / "legacy.parquet")
    assert old.tasks == TASKS and np.array_equal(old.probs, preds.probs) and np.array_equal(old.rows, preds.rows)
    pq.write_table(pa.table({"_user": [1], "p_like": [0.5]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="y_like"):
        load_predictions(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"prob_like": [0.5], "label_like": [1.0]}), tmp_path / "nouser.parquet")
    with pytest.raises(DataError, match=r"nouser.parquet.*missing \['user'\]"):
        load_predictions(tmp_path / "nouser.parquet")
    pq.write_table(pa.table({"user": [1], "prob_like": [float("nan")], "label_like": [1.0]}), tmp_path / "nan.parquet")
    with pytest.raises(DataError, match="non-finite"):
        load_predictions(tmp_path / "nan.parquet")


def test_config_errors_name_the_registered_fusions_and_the_tasks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weighted_product"):
        load_config(FuseConfig, REPO / "configs" / "fuse" / "default.yaml", ["method=weighted_mean"])
    with pytest.raises(ConfigError, match=r"no business weight for \['x'\]"):
        config().check_tasks([*TASKS, "x"])
    path = save_predictions(constructed(n=50), tmp_path / "p.parquet")
    # the default config names the seven WeChat actions; these predictions have three
    assert main(["fuse", "--predictions", str(path), "--out", str(tmp_path / "o")]) == 2


def test_fusion_search_recovers_the_known_optimum(ray_session, tmp_path: Path) -> None:
    preds = constructed()
    outcome = run_fusion(preds, config(), tmp_path / "fuse")
    found = np.array([outcome.best_weights[t] for t in TASKS])
    assert np.abs(found - W_STAR).max() < 0.08, found
    assert outcome.best["objective"] > 0.99
    assert outcome.best["objective"] > outcome.equal["objective"] + 0.02
    assert len(outcome.trials) == 60
    run = mlflow.MlflowClient(outcome.tracking_uri).get_run(outcome.run_id)
    assert run.data.metrics["best/objective"] == pytest.approx(outcome.best["objective"])
    assert math.isclose(run.data.metrics["equal/objective"], outcome.equal["objective"], abs_tol=1e-9)
    names = {a.path for a in mlflow.MlflowClient(outcome.tracking_uri).list_artifacts(outcome.run_id)}
    assert {"fusion.json", "fusion_trials.csv", "tradeoff.png", "tradeoff.json"} <= names
