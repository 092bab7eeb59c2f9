"""The demo's stages, in the order of the data flow, each a short function of the run's
:class:`Paths` and config that returns what the next stages and the final table need.

generate -> preprocess (Ray Data) -> compare (a Tune grid of Ray Train runs: single-task
baselines, Shared-Bottom, MMoE, PLE x equal weights, PCGrad) -> search (a short Tune search)
-> fuse (Tune over the fusion weights of the best model's validation predictions) -> register
(MLflow pyfunc, alias ``champion`` by the promotion rule) -> predict (the test day on Ray Data,
a submission file) -> report (the multi-task report from the comparison's MLflow runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.demo.config import DemoConfig
from pipeline.errors import DataError
from pipeline.tune.config import TuneConfig, trial_job


@dataclass(frozen=True)
class Paths:
    """Everything a demo run writes, under its ``--out``."""

    out: Path
    #: the raw logs when the user brings them (``raw:`` in the config), else generated here
    given_raw: Path | None = None

    @property
    def raw(self) -> Path:
        return self.given_raw or self.out / "raw"

    @property
    def processed(self) -> Path:
        return self.out / "processed"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"

    @property
    def submission(self) -> Path:
        return self.out / "submission.csv"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def log(self) -> Path:
        return self.out / "demo.log"


# ---------------------------------------------------------------------- data


def generate_data(cfg: DemoConfig, paths: Paths) -> dict[str, Any]:
    from pipeline.generate import generate

    if paths.given_raw is not None:
        if not paths.given_raw.is_dir():
            raise DataError(f"raw: {paths.given_raw} is not a folder")
        return {"files": sorted(p.name for p in paths.given_raw.iterdir()), "summary": f"your logs in {paths.given_raw} (nothing generated)"}
    generate(paths.raw, scale=cfg.scale, seed=cfg.seed)
    manifest = json.loads((paths.raw / "_GENERATED.json").read_text())
    return {"files": sorted(manifest.get("files", {})), "summary": f"{cfg.scale} scale, seed {cfg.seed} -> {paths.raw}"}


def preprocess_data(cfg: DemoConfig, paths: Paths) -> dict[str, Any]:
    from pipeline.config import load_config, resolve_config_path
    from pipeline.datasets import DatasetConfig
    from pipeline.preprocess import preprocess

    dataset_cfg = load_config(DatasetConfig, resolve_config_path(cfg.dataset_config), cfg.dataset_overrides)
    report = preprocess(dataset_cfg, paths.raw, paths.processed)
    splits = {k: int(v) for k, v in report.get("splits", {}).items()}
    rows = ", ".join(f"{k} {v:,}" for k, v in splits.items())
    return {"splits": splits, "summary": f"rows: {rows}"}


# ---------------------------------------------------------------------- training


def search_stage(search: TuneConfig, cfg: DemoConfig, paths: Paths, label: str) -> dict[str, Any]:
    """A Tune run (the comparison's grid or the short search) into ``<out>/<search.name>``,
    logged to the demo's store and experiment. Returns its trials (one dict each)."""
    from pipeline.demo.console import trial_progress
    from pipeline.tune.search import run_search

    search = _tracked(search, cfg, paths)
    outcome = run_search(search, paths.processed, paths.out / search.name, callbacks=[trial_progress(label)])
    if outcome.interrupted:
        raise KeyboardInterrupt(f"{label}: the search was interrupted")
    trials = [_trial_row(row, outcome.configs.get(row["trial_id"], {}), search) for row in outcome.results.to_dict("records")]
    failed = [t for t in trials if t["status"] == "error"]
    if failed:
        raise RuntimeError(f"{label}: {len(failed)} trial(s) failed, e.g. {failed[0]['label']} "
                           f"(MLflow run {failed[0]['run_id']}); see {paths.log}")
    best = max((t for t in trials if _usable(t)), key=lambda t: t["score"], default=None)
    summary = f"{len(trials)} trials" + (f", best {best['label']} valid score {best['score']:.4f}" if best else "")
    return {"trials": trials, "parent_run_id": outcome.parent_run_id, "summary": summary}


def _tracked(search: TuneConfig, cfg: DemoConfig, paths: Paths) -> TuneConfig:
    mlflow = search.mlflow.model_copy(update={"tracking_uri": cfg.mlflow.tracking_uri or paths.tracking_uri,
                                              "experiment": cfg.mlflow.experiment,
                                              "run_name": search.mlflow.run_name or search.name})
    return search.model_copy(update={"mlflow": mlflow})


def _trial_row(row: dict[str, Any], flat: dict[str, Any], search: TuneConfig) -> dict[str, Any]:
    job = trial_job(search, flat)
    score = row.get(search.metric)
    return {"stage": search.name, "trial_id": row["trial_id"], "status": row["status"], "run_id": row.get("mlflow_run_id"),
            "checkpoint": row.get("checkpoint_path"), "model": job.train.model.name, "strategy": job.train.strategy.name,
            "label": f"{job.train.model.name}/{job.train.strategy.name}", "config": flat,
            "score": float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
            "uauc": {k.removeprefix("valid/uauc_"): float(v) for k, v in row.items()
                     if k.startswith("valid/uauc_") and isinstance(v, (int, float)) and math.isfinite(v)}}


def _usable(trial: dict[str, Any]) -> bool:
    """A trial that ran to its end with a score and a model (ASHA-stopped ones logged no model)."""
    return trial["status"] == "finished" and trial["score"] is not None and isinstance(trial["run_id"], str)


def best_trial(*stages: dict[str, Any]) -> dict[str, Any]:
    """The finished trial with the highest validation score over the given stages."""
    trials = [t for s in stages for t in s["trials"] if _usable(t)]
    if not trials:
        raise RuntimeError("no trial finished with a validation score: nothing to register")
    return max(trials, key=lambda t: t["score"])


# ---------------------------------------------------------------------- ranking and registry


def fuse_stage(cfg: DemoConfig, paths: Paths, best: dict[str, Any], searches: dict[str, TuneConfig]) -> dict[str, Any]:
    """Tune the fusion weights on the best trial's validation predictions."""
    from pipeline.data import load_spec
    from pipeline.fuse import run_fusion, save_predictions
    from pipeline.tune.search import best_predictions

    spec = load_spec(paths.processed)
    job = trial_job(searches[best["stage"]], best["config"])
    preds = best_predictions(job, spec, paths.processed, best["checkpoint"])
    save_predictions(preds, paths.out / "fuse" / "valid_predictions.parquet")
    outcome = run_fusion(preds, cfg.fuse, paths.out / "fuse", tracking_uri=cfg.mlflow.tracking_uri or paths.tracking_uri,
                         experiment=cfg.mlflow.experiment)
    weights = [outcome.best_weights[t] for t in spec.tasks]
    summary = (f"{cfg.fuse.method}: objective {outcome.best['objective']:.4f} "
               f"vs {outcome.equal['objective']:.4f} with equal weights")
    return {"weights": dict(zip(spec.tasks, weights)), "best_objective": outcome.best["objective"],
            "equal_objective": outcome.equal["objective"], "run_id": outcome.run_id, "summary": summary}


def register_stage(cfg: DemoConfig, paths: Paths, best: dict[str, Any], fusion: dict[str, Any]) -> dict[str, Any]:
    from pipeline.serve.registry import register_model

    reg = register_model(best["run_id"], paths.processed, cfg.registry.name, cfg.mlflow.tracking_uri or paths.tracking_uri,
                         fusion_weights=list(fusion["weights"].values()), fusion_method=cfg.fuse.method,
                         experiment=cfg.registry.experiment)
    uri = f"models:/{reg.name}@champion"
    return {"name": reg.name, "version": reg.version, "promoted": reg.promoted, "decision": reg.decision,
            "champion_version": reg.champion_version, "model_uri": uri,
            "summary": f"{reg.name} version {reg.version} ({best['label']}); {reg.decision}"}


def predict_stage(cfg: DemoConfig, paths: Paths, registered: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    from pipeline.predict import predict_file

    requests = paths.raw / "test_a.csv"
    if not requests.is_file():
        return {"rows": 0, "path": None, "summary": f"no {requests.name} in {paths.raw}: nothing to score"}
    done = predict_file(registered["model_uri"], requests, paths.submission,
                        tracking_uri=cfg.mlflow.tracking_uri or paths.tracking_uri)
    check_submission(paths.submission, requests, tasks)
    return {"rows": done["rows"], "path": str(paths.submission), "timings_s": done["timings_s"],
            "summary": f"{done['rows']:,} rows -> {paths.submission} (checked: columns, rows in order, [0, 1], 6 decimals)"}


def check_submission(path: Path, requests: Path, tasks: list[str]) -> None:
    """The challenge's submission format: ``userid, feedid`` and one probability per action,
    the requests' rows in their order, probabilities in [0, 1] with at most 6 decimals."""
    sub = pd.read_csv(path, dtype=str)
    req = pd.read_csv(requests, usecols=["userid", "feedid"], dtype=str)
    expected = ["userid", "feedid", *tasks]
    if list(sub.columns) != expected:
        raise DataError(f"{path}: columns {list(sub.columns)}, expected {expected}")
    if len(sub) != len(req) or not (sub[["userid", "feedid"]].to_numpy() == req.to_numpy()).all():
        raise DataError(f"{path}: its userid/feedid rows are not the {len(req):,} rows of {requests} in order")
    for t in tasks:
        probs = sub[t].astype(float).to_numpy()
        decimals = sub[t].str.partition(".")[2].str.len()
        if not ((probs >= 0) & (probs <= 1)).all() or (decimals > 6).any():
            raise DataError(f"{path}: column {t}: probabilities outside [0, 1] or with more than 6 decimals")


# ---------------------------------------------------------------------- report


def report_stage(cfg: DemoConfig, paths: Paths, compare: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The multi-task report over the comparison's runs (and the registered model's, when it
    came from the search), written to ``<out>/report.md`` and logged to MLflow."""
    import mlflow

    from pipeline.report.build import build_report, close, log_report, write_report

    run_ids = [t["run_id"] for t in compare["trials"] if _usable(t)]
    if best["run_id"] not in run_ids:
        run_ids.append(best["run_id"])
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri or paths.tracking_uri)
    report = build_report(client, run_ids, cfg.report)
    try:
        plot_dir = write_report(report, paths.report)
    finally:
        close(report)
    run_id = log_report(client, report, paths.report, cfg.mlflow.experiment)
    outcomes = {c.run.run_id: c.outcome or "-" for c in report.comparisons}
    oracle = next((r.oracle["score"] for r in report.runs if r.oracle and r.oracle.get("score") is not None), None)
    return {"path": str(paths.report), "plots": str(plot_dir), "run_id": run_id, "outcomes": outcomes,
            "oracle_score": oracle, "summary": f"{paths.report} (plots in {plot_dir.name}/)"}


# ---------------------------------------------------------------------- the final table


def results_table(trials: list[dict[str, Any]], outcomes: dict[str, str], best: dict[str, Any],
                  oracle_score: float | None, tasks: list[str]) -> list[str]:
    """One row per finished model: its validation score and per-action uAUC, its outcome
    against the single-task baseline; the registered one marked; the oracle last."""
    short = {t: t[:8] for t in tasks}
    head = f"{'':2}{'stage':<8} {'model/strategy':<22} {'score':>7} " + " ".join(f"{short[t]:>8}" for t in tasks) + "  outcome"
    lines = [head, "-" * len(head)]
    for t in sorted((t for t in trials if t["score"] is not None), key=lambda t: (t["stage"] != "compare", -t["score"])):
        mark = "* " if t is best or t["run_id"] == best["run_id"] else "  "
        cells = " ".join(f"{t['uauc'][a]:>8.4f}" if a in t["uauc"] else f"{'-':>8}" for a in tasks)
        status = "" if t["status"] == "finished" else f" ({t['status']})"
        outcome = outcomes.get(t["run_id"], "baseline" if t["model"] == "single_task" else "-")
        lines.append(f"{mark}{t['stage']:<8} {t['label']:<22} {t['score']:>7.4f} {cells}  {outcome}{status}")
    if oracle_score is not None:
        lines.append(f"{'':2}{'oracle':<8} {'(true probabilities)':<22} {oracle_score:>7.4f}")
    lines.append("* registered as @champion; score: the challenge's weighted uAUC on the validation day")
    return lines


def as_json(value: Any) -> Any:
    """``value`` with numpy scalars made plain (for ``results.json``)."""
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
