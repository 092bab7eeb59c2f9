"""``python -m pipeline train`` on Ray Train: two workers on a simulated two-node cluster
(``ray_session``), MLflow from rank 0, a killed worker resumed from its checkpoint with the same
final metrics as an uninterrupted run (both evaluating a weight average, which the logged model
holds), a NaN loss named by task, step and rank."""

from __future__ import annotations

import json

from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.train.config import ValidHoldoutConfig
from pipeline.train.evaluate import predict, score_predictions
from pipeline.train.holdout import report_mask
from pipeline.valid_predictions import Predictions
from pipeline.train.config import TrainJobConfig
from pipeline.train.ray_train import run_train
from pipeline.train.stage import DEFAULT_CONFIG
from pipeline.train.step import build
from pipeline.data import load_spec
from mtl.checkpoint import load_checkpoint
from mtl.strategies import NonFiniteLossError

pytestmark = pytest.mark.slow

BASE = [
    "train.batch_size=512", "train.epochs=2", "train.optimizer.lr=0.01", "train.log_every=3", "train.strategy.name=pcgrad",
    "train.sync=global", "train.precision=float32", "scaling.num_workers=2", "scaling.placement_strategy=SPREAD",
    "scaling.cpus_per_worker=0.5", "failure.max_failures=1", "checkpoint.num_to_keep=3",
    # select on the hashed selection users only (each worker cuts its own shard: the Ray path)
    "train.valid_holdout={report_fraction: 0.5}",
    # evaluated on a weight average, which the killed worker's resume must carry on
    "train.weight_average={kind: ema, decay: 0.9}",
]


def _job(*extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, DEFAULT_CONFIG, [*BASE, *extra])


@pytest.fixture(scope="module")
def uninterrupted(tiny_processed, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_a")
    return out, run_train(_job(), tiny_processed, out)


def test_two_workers_train_and_log_to_mlflow(uninterrupted, tiny_processed):
    out, outcome = uninterrupted
    m = outcome.metrics
    # the model learned something and the oracle (true probabilities) is above it
    assert m["oracle/score"] > m["valid/score"] > 0.5
    assert m["final"] == 1.0 and m["train/steps"] > 0
    client = mlflow.MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["sync"], p["workers"], p["strategy"], p["precision"]) == ("global", "2", "pcgrad", "float32")
    assert p["compute_dtype"] == "torch.float32" and p["nodes"] == "2"
    # per-evaluation scores at each epoch's end, running losses and gradient diagnostics
    scores = client.get_metric_history(outcome.run_id, "valid/score")
    steps = sorted({s.step for s in scores})  # a restart after a failed health check logs again
    assert len(steps) == 2 and steps[1] == 2 * steps[0] == m["train/steps"]
    assert max(scores, key=lambda s: s.step).value == pytest.approx(m["valid/score"])
    assert len(client.get_metric_history(outcome.run_id, "train/loss_like")) >= 3
    conflict = client.get_metric_history(outcome.run_id, "grad/conflict_rate")
    # each logged conflict rate is the mean off-diagonal share of steps with a negative inner
    # product in that step's diagnostics, and the pairwise cosines are those of the same record
    diag = json.loads(Path(client.download_artifacts(outcome.run_id, "gradient_diagnostics.json", str(out))).read_text())
    by_step = {h["step"]: h for h in diag["history"]}
    tasks = diag["tasks"]
    assert conflict and {c.step for c in conflict} <= set(by_step)
    for c in conflict:
        matrix = np.asarray(by_step[c.step]["conflict"])
        assert c.value == pytest.approx(matrix[~np.eye(len(tasks), dtype=bool)].mean(), abs=1e-12)
    cos = client.get_metric_history(outcome.run_id, f"grad/cos_{tasks[0]}__{tasks[1]}")
    assert cos and all(c.value == pytest.approx(by_step[c.step]["cosine"][0][1], abs=1e-12) for c in cos)
    arts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "loss_curves.png", "validation_curves.png", "gradient_cosine.png",
            "gradient_conflict.png", "routing_gate.png", "valid_predictions.parquet", "model"} <= arts
    # train.valid_holdout on the workers: the run evaluated (and logged predictions of) exactly
    # the validation rows of the selection users, none of the report users', with the scores of
    # those rows
    preds = Predictions.load(client.download_artifacts(outcome.run_id, "valid_predictions.parquet", str(out)))
    valid = pq.read_table(tiny_processed / "valid", columns=["_user", "_row"]).to_pandas()
    selected = valid[~report_mask(valid["_user"].to_numpy(), ValidHoldoutConfig(report_fraction=0.5))]
    assert 0 < len(selected) < len(valid)
    assert sorted(preds.rows.tolist()) == sorted(selected["_row"].tolist())
    scored = score_predictions(preds.probs, preds.labels, preds.users, preds.tasks, "valid")
    assert scored["valid/score"] == pytest.approx(m["valid/score"], abs=1e-9)
    model_files = {a.path for a in client.list_artifacts(outcome.run_id, "model")}
    assert model_files == {"model/state.pt", "model/feature_spec.json", "model/config.yaml"}
    # the logged model is the one evaluated (the weight average, not the last weights): read
    # back, it scores the run's final score on the selection rows
    model = build(_job().train, load_spec(tiny_processed)).model
    load_checkpoint(Path(client.download_artifacts(outcome.run_id, "model/state.pt", str(out))), model, restore_rng=False)
    probs, labels, meta = predict(model, tiny_processed, "valid", load_spec(tiny_processed))
    keep = ~report_mask(meta["_user"], ValidHoldoutConfig(report_fraction=0.5))
    again = score_predictions(probs[keep], labels[keep], meta["_user"][keep], preds.tasks, "valid")
    assert again["valid/score"] == pytest.approx(m["valid/score"], abs=1e-6)
    # everything the run wrote is under its --out folder
    assert str(out) in outcome.tracking_uri and outcome.storage_path.startswith(str(out))
    assert run.info.artifact_uri.startswith(out.as_uri())


def test_killed_worker_resumes_from_checkpoint_with_the_same_metrics(uninterrupted, tiny_processed, tmp_path):
    _, a = uninterrupted
    steps_per_epoch = int(a.metrics["train/steps"]) // 2
    kill_at = steps_per_epoch + 3  # in the second epoch, after a step checkpoint
    # max_failures 3: on a loaded 2-core machine a worker health check can also time out once
    job = _job(f"failure.kill_rank_at_step=[1, {kill_at}]", "checkpoint.every_steps=2", "failure.max_failures=3")
    b = run_train(job, tiny_processed, tmp_path)
    markers = list(tmp_path.glob(".fault-injected-*"))
    assert len(markers) == 1 and f"step {kill_at}" in markers[0].read_text()  # the worker really died
    for key in ("valid/score", "valid/uauc_like", "valid/logloss_read_comment", "train/steps"):
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-9, abs=1e-12), key


def test_nan_loss_stops_the_run_naming_task_step_and_rank(tiny_processed, ray_session, tmp_path):
    job = _job("failure.max_failures=0", "train.log_every=2", "failure.nan_label_at={rank: 1, step: 3, task: like}")
    with pytest.raises(Exception) as err:
        run_train(job, tiny_processed, tmp_path)
    text = str(err.value)
    assert "['like']" in text and "step 3" in text and "rank 1" in text
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(job.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
