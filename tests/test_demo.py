"""The README's main job, end to end at tiny scale: generate -> preprocess -> train -> score."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtl.precision import resolve_compute_dtype
from pipeline.config import load_config
from pipeline import demo as demo_module
from pipeline.demo import DEFAULT_CONFIG, DemoConfig, run_demo
from test_metrics import _official_uauc


@pytest.mark.slow
def test_demo_end_to_end_logs_run_and_beats_chance(tmp_path, ray_session, monkeypatch):
    cfg = load_config(DemoConfig, DEFAULT_CONFIG, ["scale=tiny", "train.epochs=8", "train.batch_size=1024", "train.log_every=10"])
    seen = {}
    original = demo_module.predict

    def spy(*args, **kw):  # the final model's validation predictions, as the demo makes them
        seen["out"] = original(*args, **kw)
        return seen["out"]

    monkeypatch.setattr("pipeline.demo.predict", spy)
    metrics = run_demo(cfg, tmp_path / "demo")
    tasks = cfg_tasks(tmp_path)
    official = {"read_comment": 4, "like": 3, "click_avatar": 2, "forward": 1, "favorite": 1, "comment": 1, "follow": 1}
    assert set(tasks) == set(official)
    probs, labels, meta = seen["out"]
    # the logged metrics are the official scorer's (re-stated in tests/test_metrics.py) on
    # those predictions, and the oracle's on the generator's true probabilities of the same rows
    oracle = pd.read_parquet(tmp_path / "demo" / "raw" / "oracle" / "oracle_train.parquet").set_index("row")
    true_p = oracle.loc[meta["_row"] - 1]
    assert np.array_equal(true_p["userid"].to_numpy(), meta["_user"])
    users = meta["_user"].tolist()
    rng = np.random.default_rng(0)
    u, u_oracle, u_shuffled, scored = [], [], [], []
    for k, t in enumerate(tasks):
        both = pd.Series(labels[:, k]).groupby(meta["_user"]).nunique().eq(2).any()
        assert (f"valid/uauc_{t}" in metrics) == both, t  # scored iff some user has both classes
        if not both:
            continue
        scored.append(t)
        u.append(_official_uauc(labels[:, k], np.round(probs[:, k], 6), users))
        u_oracle.append(_official_uauc(labels[:, k], np.round(true_p[f"p_{t}"].to_numpy(), 6), users))
        u_shuffled.append(_official_uauc(labels[:, k], rng.permutation(np.round(probs[:, k], 6)), users))
        assert metrics[f"valid/uauc_{t}"] == pytest.approx(u[-1], abs=1e-9), t
        assert metrics[f"oracle/uauc_{t}"] == pytest.approx(u_oracle[-1], abs=1e-9), t
    assert {"read_comment", "like", "click_avatar", "forward"} <= set(scored)
    weighted = lambda v: sum(official[t] * x for t, x in zip(scored, v)) / sum(official[t] for t in scored)  # noqa: E731
    assert metrics["valid/score"] == pytest.approx(weighted(u), abs=1e-6)
    assert metrics["oracle/score"] == pytest.approx(weighted(u_oracle), abs=1e-6)
    # the trained model beats the same predictions shuffled across rows by a margin, and the
    # oracle (true probabilities) is the ceiling
    assert metrics["valid/score"] > weighted(u_shuffled) + 0.05
    assert metrics["oracle/score"] > metrics["valid/score"]
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
