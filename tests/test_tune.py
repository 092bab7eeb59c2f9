"""``python -m pipeline tune`` on tiny data: a search interrupted after its first trial and
resumed with the same command runs to the end without rerunning what had ended; ASHA stops
some trials; every trial is a nested MLflow run with its params and per-epoch metrics; the
best trial's config and validation predictions are saved. Config errors fail before any trial.

One search serves the Ray tests (module fixture, about two minutes on 2 busy cores): 3
trials drawn by random search (seed 0), one at a time (so ASHA's decisions and the interrupt
point are the same on every run), 1 worker of 0.5 CPU each, 3 epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, OutputError
from pipeline.fuse import load_predictions
from pipeline.train.config import TrainJobConfig
from pipeline.tune.config import TuneConfig
from pipeline.tune.search import child_runs, run_search

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tune" / "tiny.yaml"
SAMPLES, EPOCHS = 3, 3
OVERRIDES = [
    f"search.num_samples={SAMPLES}", "search.algorithm=random", "search.seed=0", "search.max_concurrent=1",
    "base.scaling.num_workers=1", "base.scaling.cpus_per_worker=0.5", f"base.train.epochs={EPOCHS}",
    "interrupt_after_trials=1",
]


def _history(client: mlflow.MlflowClient, run_id: str, key: str = "valid/score") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def search(tiny_processed: Path, ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The search, interrupted after its first trial, what MLflow held then, and the resumed search."""
    cfg = load_config(TuneConfig, CONFIG, OVERRIDES)
    out = tmp_path_factory.mktemp("tune") / "search"
    first = run_search(cfg, tiny_processed, out)
    client = mlflow.MlflowClient(first.tracking_uri)
    ended = first.results[first.results["status"].isin(["finished", "stopped"])]
    before = {row["trial_id"]: _history(client, row["mlflow_run_id"]) for row in ended.to_dict("records")}
    second = run_search(cfg, tiny_processed, out)
    return {"cfg": cfg, "out": out, "first": first, "ended_first": ended, "before": before, "second": second,
            "client": client}


def test_an_interrupted_search_resumes_without_rerunning_ended_trials(search: dict[str, Any]) -> None:
    first, second, client = search["first"], search["second"], search["client"]
    assert first.interrupted and len(search["ended_first"]) >= 1
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    results = second.results
    assert len(results) == SAMPLES and set(results["status"]) <= {"finished", "stopped"}
    for row in search["ended_first"].to_dict("records"):
        again = results.set_index("trial_id").loc[row["trial_id"]]
        assert again["status"] == row["status"] and again["valid/score"] == row["valid/score"]  # the same result
        # the trial did not run again: its run holds the evaluations of the first part only
        assert _history(client, row["mlflow_run_id"]) == search["before"][row["trial_id"]]
    assert len(child_runs(second.tracking_uri, second.parent_run_id)) == SAMPLES  # no second run for a trial


def test_asha_stops_some_trials_and_lets_others_finish(search: dict[str, Any]) -> None:
    results = search["second"].results
    stopped, finished = results[results["status"] == "stopped"], results[results["status"] == "finished"]
    assert len(stopped) >= 1 and len(finished) >= 1
    assert (stopped["epoch"] < EPOCHS).all() and (finished["epoch"] == EPOCHS).all()


def test_every_trial_is_a_nested_run_with_params_and_per_epoch_metrics(search: dict[str, Any]) -> None:
    second, client = search["second"], search["client"]
    for row in second.results.to_dict("records"):
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == second.parent_run_id
        assert run.info.status == "FINISHED" and run.data.tags["tune.outcome"] == row["status"]
        params = run.data.params
        assert params["model"] == row["config/model"] in {"shared_bottom", "mmoe", "ple", "snr"}
        assert params["strategy"] == row["config/strategy"] in {"equal", "uncertainty", "dwa"}
        assert float(params["train.optimizer.lr"]) == pytest.approx(row["config/train.optimizer.lr"])
        # one evaluation per epoch; a trial ASHA stops may finish an epoch more before it is killed
        epochs = [int(m.value) for m in client.get_metric_history(row["mlflow_run_id"], "epoch")]
        done = EPOCHS if row["status"] == "finished" else int(row["epoch"])
        assert epochs == list(range(1, len(epochs) + 1)) and (len(epochs) == done if done == EPOCHS else len(epochs) >= done)
        assert len(_history(client, row["mlflow_run_id"])) == len(epochs)


def test_the_parent_run_holds_the_space_results_and_best_trial(search: dict[str, Any]) -> None:
    second, client = search["second"], search["client"]
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(second.parent_run_id)}
    assert {"search_space.yaml", "tune_config.yaml", "results.csv", "best_config.yaml", "predictions"} <= names
    best = second.results.loc[second.results["valid/score"].idxmax()]
    assert parent.data.params["best_trial_id"] == best["trial_id"]
    assert parent.data.metrics["best/valid/score"] == pytest.approx(best["valid/score"])
    job = load_config(TrainJobConfig, second.best_config_path)  # runnable with python -m pipeline train
    assert job.train.model.name == best["config/model"]
    preds = load_predictions(second.predictions_path)
    assert preds.tasks == ["read_comment", "like", "click_avatar", "forward", "favorite", "comment", "follow"]
    assert len(preds.users) > 0


def test_the_same_out_with_another_config_fails(search: dict[str, Any], tiny_processed: Path) -> None:
    cfg = load_config(TuneConfig, CONFIG, [*OVERRIDES, "search.seed=1"])
    with pytest.raises(OutputError, match="another config"):
        run_search(cfg, tiny_processed, search["out"])


@pytest.mark.parametrize("override, message", [
    ("space.model.mmo={}", r"'mmo' unknown; registered: \['mmoe', 'ple', 'shared_bottom'"),
    ("space.model.mmoe.num_expertz={type: int, low: 1, high: 4}", r"unknown parameter\(s\) \['num_expertz'\]; accepted: .*'num_experts'"),
    ("space.strategy.dwa.temperature={type: float, low: 2, high: 1}", "need low < high"),
    ("space.params.train.optimizer.lrr=0.1", "train.optimizer.lrr"),
])
def test_a_bad_space_fails_before_any_trial(override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TuneConfig, CONFIG, [override])
    # the CLI: one line, exit 2, no Ray started, nothing written
    assert main(["tune", "--config", str(CONFIG), "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", override]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_value_a_model_rejects_fails_against_the_data_before_any_trial(tiny_processed: Path, tmp_path: Path) -> None:
    from pipeline.tune.search import check_search

    cfg = load_config(TuneConfig, CONFIG, ["space.model.ple.num_levels={type: int, low: 0, high: 2}"])
    with pytest.raises(ConfigError, match="num_levels >= 1"):
        check_search(cfg, tiny_processed)
