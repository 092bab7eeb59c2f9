"""The README's main job, end to end at tiny scale: generate -> preprocess -> train -> score."""

import json

import mlflow
import pytest
import torch
import yaml

from mtl.precision import resolve_compute_dtype
from pipeline.config import load_config
from pipeline.demo import DEFAULT_CONFIG, DemoConfig, run_demo


@pytest.mark.slow
def test_demo_end_to_end_logs_run_and_beats_chance(tmp_path, ray_session):
    cfg = load_config(DemoConfig, DEFAULT_CONFIG, ["scale=tiny", "train.epochs=8", "train.batch_size=1024", "train.log_every=10"])
    metrics = run_demo(cfg, tmp_path / "demo")
    tasks = ["read_comment", "like", "click_avatar", "forward"]
    for t in tasks:
        assert 0.0 <= metrics[f"valid/uauc_{t}"] <= 1.0
    # the oracle (true probabilities) is the ceiling; the trained model learned something
    assert metrics["oracle/score"] > metrics["valid/score"] > 0.55
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["valid/score"] == metrics["valid/score"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model"] == "mmoe"
    assert run.data.params["precision"] == cfg.train.precision == "auto"
    # what "auto" resolved to on this machine is logged next to it
    resolved = resolve_compute_dtype("auto", torch.device("cpu"), torch.float32)
    assert run.data.params["compute_dtype"] == str(resolved)
    assert run.data.metrics["valid/score"] == pytest.approx(metrics["valid/score"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curves.png", "preprocess_report.json", "routing_gate.png"} <= artifacts
    gate = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/routing_gate.json")
    assert gate["tasks"] == cfg_tasks(tmp_path)
    for row in gate["mean"]:  # each task's mean gate is a distribution over the experts
        assert len(row) == cfg.train.model.params["num_experts"]
        assert sum(row) == pytest.approx(1.0, abs=1e-6) and min(row) >= 0.0
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert DemoConfig.model_validate(yaml.safe_load(logged)) == cfg


def cfg_tasks(tmp_path):
    from pipeline.data import load_spec

    return load_spec(tmp_path / "demo" / "processed").tasks


def test_demo_config_rejects_unknown_model():
    with pytest.raises(ValueError, match="unknown"):
        load_config(DemoConfig, DEFAULT_CONFIG, ["train.model.name=nope"])
