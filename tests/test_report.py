"""The multi-task report rebuilt from MLflow runs trained on the tiny generated data: every
model's row, the oracle's, the outcome classes, the plots, the CLI stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtl.metrics import user_auc
from pipeline.cli import main
from pipeline.data import iter_local_batches
from pipeline.report import OUTCOMES, ReportConfig, build_report, classify, log_validation_predictions, write_report
from pipeline.report.build import close
from pipeline.tracking import RunLogger, tracked_run
from pipeline.train import TrainConfig, oracle_metrics, predict, train_local
from pipeline.train.evaluate import mean_routing

EXPERIMENT = "report-test"
MODELS = [  # (model, params, strategy): the baseline and two multi-task models
    ("single_task", {"hidden": [16]}, "equal"),
    ("mmoe", {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]}, "pcgrad"),
    ("shared_bottom", {}, "equal"),
]


def _train_and_log(uri: str, root: Path, data: Path, raw: Path, model: str, params: dict[str, Any], strategy: str) -> str:
    """A run in MLflow as the trainer logs it: params, metrics per evaluation and running
    losses, the oracle's metrics, gradient diagnostics, gate utilisation, validation predictions."""
    cfg = TrainConfig(model={"name": model, "params": params}, strategy={"name": strategy}, epochs=1,
                      batch_size=1024, max_steps=12, log_every=3, torch_threads=1, precision="float32")
    with tracked_run(uri, EXPERIMENT, run_name=f"{model}-{strategy}", artifact_root=root) as run_id:
        log = RunLogger(uri, run_id)
        log.params({"model": model, "strategy": strategy, "sync": cfg.sync, "workers": 1})
        result = train_local(cfg, data, on_log=lambda s, rec: log.metrics({k: v for k, v in rec.items() if k.startswith("train/")}, s),
                             on_eval=lambda s, m: log.metrics(m, s))
        tasks = result.spec.tasks
        probs, labels, meta = predict(result.model, data, "valid", result.spec)
        log.metrics(oracle_metrics(raw, meta, labels, tasks), step=cfg.max_steps)
        grads = [h for h in result.history if "gradients" in h]
        if grads:
            log.dict({"tasks": tasks, "history": [{"step": h["step"], **h["gradients"]} for h in grads]},
                     "gradient_diagnostics.json")
        for name, mean in mean_routing(result.model, iter_local_batches(data, "valid", 4096, spec=result.spec)).items():
            log.dict({"tasks": tasks, "mean": mean.tolist()}, f"routing_{name}.json")
        log_validation_predictions(log, run_id, probs, labels, meta["_user"], tasks, rows=meta["_row"])
    return run_id


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tiny_processed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The tracking URI and ``{model: run_id}``."""
    tmp = tmp_path_factory.mktemp("report_mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    ids = {m: _train_and_log(uri, tmp / "artifacts", tiny_processed, tiny_raw, m, p, s) for m, p, s in MODELS}
    return uri, ids


def test_report_from_mlflow_runs(runs: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    import mlflow

    uri, ids = runs
    client = mlflow.MlflowClient(uri)
    report = build_report(client, list(ids.values()), ReportConfig(n_boot=200))
    plot_dir = write_report(report, tmp_path / "report.md")
    close(report)
    text = (tmp_path / "report.md").read_text()

    # every model's row in both metric tables, and the oracle's
    for run in report.runs:
        assert text.count(f"| {run.model} | {run.strategy} | {run.name} |") == 2 + (not run.is_single_task)
        # the logged scores are those of the logged predictions
        assert run.predictions is not None and run.oracle is not None
        for t in run.metrics["uauc"]:
            p, y = run.predictions.task(t)
            assert run.metrics["uauc"][t] == pytest.approx(user_auc(y, p, run.predictions.users), abs=1e-9)
    assert text.count("| **oracle** |") == 2
    oracle = report.runs[0].oracle
    assert oracle is not None and oracle["score"] is not None

    # outcome of every multi-task model: one of the classes, the one its per-task verdicts give
    assert [c.run.model for c in report.comparisons] == ["mmoe", "shared_bottom"]
    for c in report.comparisons:
        # tasks where fewer than 10 validation users have both classes are left out (tiny's
        # "comment" has none, "favorite" a handful)
        assert c.outcome in OUTCOMES and c.differences and c.too_few
        assert all(d.users >= 10 for d in c.differences.values()) and all(d.users < 10 for d in c.too_few.values())
        assert set(c.differences) | set(c.too_few) == set(c.run.metrics["uauc"])
        assert c.missing == [t for t in c.run.tasks if t not in c.differences]
        assert c.outcome == classify({t: d.verdict for t, d in c.differences.items()})
        assert set(c.baseline.values()) == {ids["single_task"]}
        assert f"| {c.run.model} | {c.run.strategy} | {c.run.name} | **{c.outcome}** |" in text
    assert "paired bootstrap over users (200 resamples, seed 0)" in text

    # plots: the comparisons, and per run the loss scales; gradients and gates where logged
    files = {p.name for p in plot_dir.iterdir()}
    assert {"uauc_per_task.png", "vs_single_task.png"} <= files
    assert {"00_single_task_equal_loss_curves.png", "01_mmoe_pcgrad_loss_curves.png",
            "02_shared_bottom_equal_loss_curves.png"} <= files
    assert {"01_mmoe_pcgrad_gradient_cosine.png", "01_mmoe_pcgrad_gradient_conflict.png",
            "01_mmoe_pcgrad_gradient_norms_conflict.png"} <= files
    assert any(f.startswith("01_mmoe_pcgrad_routing_") for f in files)
    assert not any(f.startswith("02_shared_bottom_routing_") for f in files)
    for name in files:
        assert f"]({plot_dir.name}/{name})" in text  # linked from the Markdown
        assert (plot_dir / name).stat().st_size > 1000

    # the same seed gives the same intervals
    again = build_report(client, list(ids.values()), ReportConfig(n_boot=200))
    close(again)
    assert [c.differences for c in again.comparisons] == [c.differences for c in report.comparisons]


def test_report_accepts_per_task_single_task_runs(runs: tuple[str, dict[str, str]]) -> None:
    """Single-task runs of one task each (here: the joint baseline's columns, logged as one run
    per task) give the same comparison as the joint single-task run."""
    import mlflow

    uri, ids = runs
    client = mlflow.MlflowClient(uri)
    joint = build_report(client, [ids["mmoe"], ids["single_task"]], ReportConfig(n_boot=100))
    close(joint)
    base = joint.runs[1].predictions
    assert base is not None
    per_task = []
    for k, t in enumerate(base.tasks):
        with tracked_run(uri, EXPERIMENT, run_name=f"single-{t}") as run_id:
            log = RunLogger(uri, run_id)
            log.params({"model": "single_task", "strategy": "equal"})
            y, p = base.labels[:, k : k + 1], base.probs[:, k : k + 1]
            log.metrics({f"valid/uauc_{t}": user_auc(y[:, 0], p[:, 0], base.users)}, step=1)
            log_validation_predictions(log, run_id, p, y, base.users, [t], rows=base.rows)
        per_task.append(run_id)
    split = build_report(client, [ids["mmoe"], *per_task], ReportConfig(n_boot=100))
    close(split)
    (c,) = split.comparisons
    assert c.differences == joint.comparisons[0].differences and c.outcome == joint.comparisons[0].outcome
    assert c.baseline == {t: r for t, r in zip(base.tasks, per_task) if t in c.differences}


def test_report_stage(runs: tuple[str, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    uri, ids = runs
    out = tmp_path / "out" / "mt.md"
    argv = ["report", "--runs", *ids.values(), "--tracking-uri", uri, "--out", str(out), "--bootstrap", "50"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "# Multi-task report" in printed and out.is_file() and (tmp_path / "out" / "mt_plots" / "uauc_per_task.png").is_file()
    client = mlflow.MlflowClient(uri)
    (report_run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                       "tags.`mtlrank.kind` = 'report'")
    logged = {f.path for f in client.list_artifacts(report_run.info.run_id)}
    assert {"mt.md", "mt_plots"} <= logged
    assert "uauc_per_task.png" in {Path(f.path).name for f in client.list_artifacts(report_run.info.run_id, "mt_plots")}

    assert main(["report", "--runs", "0" * 32, "--tracking-uri", uri, "--out", str(out)]) == 2
    assert "run '" + "0" * 32 + "': not found" in capsys.readouterr().err
