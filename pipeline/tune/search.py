"""A Ray Tune search over train jobs, each trial a distributed Ray Train run (Tune around
Train, as Ray documents it for Train V2): the trial function builds the job's
``TorchTrainer`` (:func:`~pipeline.train.ray_train.make_trainer`) with Tune's report callback
and fits it; every evaluation of the workers reaches Tune, where ASHA stops poor trials on the
validation score and the searcher (Optuna TPE or random) draws the next configs.

Checked before any trial starts (:func:`check_search`). Resumable: the same command with the
same ``--out`` continues an interrupted search (``Tuner.restore``): finished trials are kept,
unfinished ones continue from their last Train checkpoint (the Train run of a trial is named
after the trial, so it restores itself). MLflow: one parent run per search (the space, the
config, the results table, the best config, runnable with ``python -m pipeline train``), one
nested run per trial (its params and config; the workers log every evaluation to it). The best
trial's validation predictions are saved for ``python -m pipeline fuse`` (and the config's
``fuse`` step).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtl.features import FeatureSpec
from pipeline.config import dump_config
from pipeline.errors import ConfigError, OutputError, UserError
from pipeline.fuse import FuseOutcome, run_fusion, save_predictions
from pipeline.tune.config import TuneConfig, trial_job
from pipeline.tune.space import make_searcher
from pipeline.valid_predictions import Predictions

STATE_FILE = "search.yaml"
TRIAL_TAG = "tune.trial_id"


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before its last trial (Ctrl-C, SIGUSR1, the testing aid)."""


# ---------------------------------------------------------------------- checks


def check_search(cfg: TuneConfig, data_dir: str | Path) -> FeatureSpec:
    """Everything checkable before a trial starts: the data, and every corner of the space
    builds its model and strategy on the data's feature spec. Returns the spec."""
    from mtl.strategies import build_strategy
    from pipeline.train.ray_train import check_job

    spec = None
    for flat in cfg.checked_trials():
        job = trial_job(cfg, flat)
        try:
            spec = check_job(job, data_dir)
            build_strategy(job.train.strategy.name, num_tasks=spec.num_tasks, **job.train.strategy.params)
        except ValueError as exc:  # a model or strategy that does not build at this corner
            if isinstance(exc, UserError):
                raise
            raise ConfigError(f"space: {job.train.model.name} / {job.train.strategy.name} at {flat}: {exc}") from None
    assert spec is not None  # the space has at least its two corners
    if cfg.fuse is not None:
        cfg.fuse.check_tasks(spec.tasks)
    return spec


# ---------------------------------------------------------------------- the trial


@dataclass
class TrialContext:
    """What every trial needs besides its drawn config (shipped once through the object store)."""

    cfg: TuneConfig
    data_dir: str
    out: str
    spec: FeatureSpec
    tracking_uri: str
    parent_run_id: str


def run_trial(flat: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: the nested MLflow run (found again when a resumed trial restarts), then the
    job's TorchTrainer with Tune's report callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.tracking import RunLogger, tracked_run
    from pipeline.train.ray_train import make_trainer

    trial_id = tune.get_context().get_trial_id()
    job = trial_job(ctx.cfg, flat)
    existing = child_runs(ctx.tracking_uri, ctx.parent_run_id).get(trial_id)
    with tracked_run(ctx.tracking_uri, ctx.cfg.mlflow.experiment, run_name=f"trial-{trial_id}",
                     artifact_root=Path(ctx.out) / "mlartifacts", tags={TRIAL_TAG: trial_id},
                     parent_run_id=ctx.parent_run_id, run_id=existing) as run_id:
        if existing is None:
            log = RunLogger(ctx.tracking_uri, run_id)
            log.params({**flat, "trial_id": trial_id, "seed": job.train.seed, "epochs": job.train.epochs})
            log.text(dump_config(job), "config.yaml")
        trainer = make_trainer(job, ctx.data_dir, ctx.out, ctx.spec, run_id=run_id, tracking_uri=ctx.tracking_uri,
                               name=f"trial-{trial_id}", callbacks=[TuneReportCallback()])
        trainer.fit()


def child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """``trial id -> MLflow run id`` of a search's nested runs."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _interrupt_after(n: int, marker: Path) -> Any:
    """Testing aid: a Tune callback that sends this process SIGUSR1 (Tune's graceful interrupt,
    as Ctrl-C) once ``n`` trials have ended; once per output folder (a marker file)."""
    from ray.tune import Callback

    class InterruptAfter(Callback):
        ended = 0

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.ended += 1
            if self.ended >= n and not marker.exists():
                marker.write_text(f"interrupted after {self.ended} trial(s)\n")
                os.kill(os.getpid(), signal.SIGUSR1)

    return InterruptAfter()


# ---------------------------------------------------------------------- the driver


@dataclass
class SearchOutcome:
    parent_run_id: str
    tracking_uri: str
    results: Any  # pandas.DataFrame, one row per trial
    configs: dict[str, dict[str, Any]]  # trial id -> the drawn flat config
    best: dict[str, Any] | None  # the best row
    best_config_path: Path | None
    predictions_path: Path | None
    fusion: FuseOutcome | None
    interrupted: bool
    experiment_path: str


def run_search(cfg: TuneConfig, data_dir: str | Path, out: str | Path, address: str | None = None,
               num_cpus: int | None = None, callbacks: list[Any] | None = None) -> SearchOutcome:
    """Search (or resume the search in ``out``), log to MLflow, save the best trial's
    validation predictions and run the fusion step if configured.

    Args:
        cfg: the search; data_dir: preprocess output; out: the run folder.
        address, num_cpus: the Ray to use (see :func:`pipeline.ray_runtime.ensure_ray`).
        callbacks: extra Tune callbacks (e.g. progress lines) for a new search.
    """
    from pipeline.ray_runtime import ensure_ray
    from pipeline.tracking import RunLogger, resolve_tracking_uri, tracked_run

    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    spec = check_search(cfg, data_dir)
    state = _open_state(cfg, data_dir, out)
    ensure_ray(num_cpus=num_cpus, address=address, state_api=True)
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, out)
    cfg = _resolve_cpus(cfg)
    try:
        with tracked_run(uri, cfg.mlflow.experiment, run_name=cfg.mlflow.run_name or f"search-{cfg.name}",
                         artifact_root=out / "mlartifacts", run_id=state.get("parent_run_id")) as parent:
            log = RunLogger(uri, parent)
            if "parent_run_id" not in state:
                state["parent_run_id"] = parent
                (out / STATE_FILE).write_text(yaml.safe_dump(state, sort_keys=False))
                _log_search(log, cfg, data_dir)
            ctx = TrialContext(cfg, str(data_dir), str(out), spec, uri, parent)
            path = _fit(cfg, ctx, out, callbacks or [])
            results, configs = _results(cfg, path, child_runs(uri, parent))
            _close_children(uri, results)
            outcome = SearchOutcome(parent, uri, results, configs, None, None, None, None, False, path)
            if len(results) < cfg.trial_count() or (results["status"] == "unfinished").any():
                outcome.interrupted = True
                raise SearchInterrupted(f"{len(results)} of {cfg.trial_count()} trials started, not all ended")
            _finish(cfg, ctx, log, outcome, out)
    except SearchInterrupted:
        pass  # the parent run ends KILLED; the same command resumes the search
    return outcome


def _open_state(cfg: TuneConfig, data_dir: Path, out: Path) -> dict[str, Any]:
    """``<out>/search.yaml`` (the config, the data and the parent run); a folder holding another
    search fails."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / STATE_FILE
    mine = {"config": cfg.model_dump(mode="json"), "data": str(data_dir)}
    if not path.is_file():
        return mine
    state = yaml.safe_load(path.read_text()) or {}
    if {k: state.get(k) for k in mine} != mine:
        raise OutputError(f"{out} holds a search with another config or data ({path}); resume it with "
                          "those or give another --out")
    return state


def _resolve_cpus(cfg: TuneConfig) -> TuneConfig:
    """The trials' CPUs against the cluster's: ``max_concurrent`` trials, each its own process
    and its workers, must leave one whole CPU to Ray Data's readers (a read task asks for one;
    without it every trial waits for its data forever). ``base.scaling.cpus_per_worker: auto``
    takes what is left after that, split over the workers (in steps of 0.05)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    scaling, trials = cfg.base.scaling, cfg.search.max_concurrent
    spare = cpus - 1.0 - trials * cfg.trial.cpus
    per = scaling.cpus_per_worker
    if per == "auto":
        per = math.floor(20 * spare / (trials * scaling.num_workers)) / 20
    if per < 0.05 or trials * scaling.num_workers * per > spare + 1e-9:
        raise ConfigError(
            f"{trials} trial(s) at once with {scaling.num_workers} worker(s) of {scaling.cpus_per_worker} CPU "
            f"and {cfg.trial.cpus} CPU per trial process do not fit in the cluster's {cpus:g} CPUs with one left "
            "for Ray Data's readers: lower search.max_concurrent, base.scaling.num_workers or "
            "base.scaling.cpus_per_worker")
    return cfg.model_copy(update={"base": cfg.base.model_copy(update={"scaling": scaling.model_copy(update={"cpus_per_worker": per})})})


def _log_search(log: Any, cfg: TuneConfig, data_dir: Path) -> None:
    log.text(dump_config(cfg), "tune_config.yaml")
    log.text(yaml.safe_dump(cfg.space.model_dump(mode="json"), sort_keys=False), "search_space.yaml")
    log.params({"data": str(data_dir), "algorithm": cfg.search.algorithm, "num_samples": cfg.trial_count(),
                "max_concurrent": cfg.search.max_concurrent, "search_seed": cfg.search.seed, "metric": cfg.metric,
                "scheduler": cfg.scheduler.name, "grace_period": cfg.scheduler.grace_period,
                "reduction_factor": cfg.scheduler.reduction_factor, "workers_per_trial": cfg.base.scaling.num_workers,
                "cpus_per_worker": cfg.base.scaling.cpus_per_worker, "train_seed": cfg.base.train.seed,
                "architectures": ",".join(cfg.space.model) or cfg.base.train.model.name,
                "strategies": ",".join(cfg.space.strategy) or cfg.base.train.strategy.name})


def _fit(cfg: TuneConfig, ctx: TrialContext, out: Path, callbacks: list[Any]) -> str:
    """Run a new search, or restore the interrupted one under ``<out>/tune/<name>``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = out / "tune"
    path = storage / cfg.name
    # Tune rejects an empty request: a trial process that reserves no CPU asks for 1 byte of memory
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.trial.cpus, "memory": 1})
    if tune.Tuner.can_restore(str(path)):
        tune.Tuner.restore(str(path), trainable, resume_unfinished=True).fit()
        return str(path)
    if cfg.scheduler.name == "asha":
        # one rung per evaluated epoch; max_t beyond the last so that ASHA never cuts the
        # final report of a trial that runs to its end
        scheduler: Any = ASHAScheduler(time_attr="epoch", max_t=cfg.max_epochs() + 1,
                                       grace_period=cfg.scheduler.grace_period,
                                       reduction_factor=cfg.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    callbacks = list(callbacks)
    if cfg.interrupt_after_trials is not None:
        callbacks.append(_interrupt_after(cfg.interrupt_after_trials, out / ".interrupted"))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", scheduler=scheduler,
                                    search_alg=make_searcher(cfg.space.sampler(), cfg.search, cfg.metric, "max"),
                                    num_samples=cfg.trial_count(),  # a grid point replaces one sample
                                    max_concurrent_trials=cfg.search.max_concurrent,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(storage), verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=cfg.trial.max_failures)),
    )
    tuner.fit()
    return str(path)


def _results(cfg: TuneConfig, path: str, runs: dict[str, str]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """One row per trial, from the experiment state Tune saved (on an interrupt it is saved
    before the running trials are stopped, so they read as unfinished): the outcome (finished,
    stopped by ASHA, error, unfinished), the drawn config, the last reported metrics, the
    nested run and the last checkpoint."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    rows, configs = [], {}
    for trial in ExperimentAnalysis(path).trials:
        configs[trial.trial_id] = dict(trial.config or {})
        metrics = trial.last_result or {}
        if trial.status == "ERROR":
            status = "error"
        elif trial.status != "TERMINATED":
            status = "unfinished"
        else:  # ended by itself (its final report) or by ASHA
            status = "finished" if metrics.get("final") else "stopped"
        row = {"trial_id": trial.trial_id, "status": status, cfg.metric: metrics.get(cfg.metric, float("nan")),
               "epoch": metrics.get("epoch"), "steps": metrics.get("step"), "mlflow_run_id": runs.get(trial.trial_id),
               "checkpoint_path": metrics.get("checkpoint_path")}
        row.update({f"valid/uauc_{t}": metrics.get(f"{cfg.base.data.valid_split}/uauc_{t}") for t in _tasks(metrics, cfg)})
        row.update({f"config/{k}": v for k, v in (trial.config or {}).items()})
        rows.append(row)
    columns = ["trial_id", "status", cfg.metric, "mlflow_run_id", "checkpoint_path"]
    return pd.DataFrame(rows, columns=None if rows else columns).sort_values("trial_id", ignore_index=True), configs


def _tasks(metrics: dict[str, Any], cfg: TuneConfig) -> list[str]:
    prefix = f"{cfg.base.data.valid_split}/uauc_"
    return [k.removeprefix(prefix) for k in metrics if k.startswith(prefix)]


def _close_children(uri: str, results: Any) -> None:
    """End every nested run as its trial ended, and tag the outcome: Tune kills the process of a
    trial it stops (ASHA, an interrupt), which leaves its run RUNNING or, when the stop reached
    the trainer first, FAILED; a trial ASHA stopped is a normal end (FINISHED)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    ends = {"finished": "FINISHED", "stopped": "FINISHED", "error": "FAILED", "unfinished": "KILLED"}
    for row in results.itertuples():
        if isinstance(row.mlflow_run_id, str):
            client.set_tag(row.mlflow_run_id, "tune.outcome", row.status)
            client.set_terminated(row.mlflow_run_id, status=ends[row.status])


def _finish(cfg: TuneConfig, ctx: TrialContext, log: Any, outcome: SearchOutcome, out: Path) -> None:
    """The results table, the best trial's config, metrics and predictions, the fusion step
    (filled into ``outcome``)."""
    results = outcome.results
    with tempfile.TemporaryDirectory() as d:
        results.to_csv(Path(d) / "results.csv", index=False)
        log.artifact(Path(d) / "results.csv")
    counts = results["status"].value_counts().to_dict()
    log.metrics({f"trials/{k}": float(v) for k, v in counts.items()}, step=0)
    scored = results[results[cfg.metric].notna() & results["checkpoint_path"].notna()]
    if scored.empty:
        return
    best = scored.loc[scored[cfg.metric].idxmax()].to_dict()
    flat = outcome.configs[best["trial_id"]]
    job = trial_job(cfg, flat)
    best_config = out / "best_config.yaml"
    best_config.write_text(f"# best trial {best['trial_id']} of the search in {out}\n{dump_config(job)}")
    log.artifact(best_config)
    log.metrics({f"best/{k}": float(v) for k, v in best.items() if k.startswith("valid/") and _finite(v)}, step=0)
    log.params({"best_trial_id": best["trial_id"], "best_run_id": best["mlflow_run_id"],
                **{f"best.{k}": v for k, v in flat.items()}})
    preds = best_predictions(job, ctx.spec, ctx.data_dir, best["checkpoint_path"])
    predictions = save_predictions(preds, out / "predictions" / f"{job.data.valid_split}.parquet")
    log.artifact(predictions, "predictions")
    outcome.best, outcome.best_config_path, outcome.predictions_path = best, best_config, predictions
    if cfg.fuse is not None:
        outcome.fusion = run_fusion(preds, cfg.fuse, out / "fuse", tracking_uri=ctx.tracking_uri,
                                    parent_run_id=ctx.parent_run_id, experiment=cfg.mlflow.experiment)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_predictions(job: Any, spec: FeatureSpec, data_dir: str | Path, checkpoint_path: str) -> Predictions:
    """The validation predictions of a trial's last checkpoint (read locally, no Ray)."""
    import torch

    from mtl.checkpoint import STATE_FILE as CKPT, load_checkpoint
    from pipeline.train.evaluate import predict
    from pipeline.train.step import build

    model = build(job.train, spec).model
    load_checkpoint(Path(checkpoint_path) / CKPT, model, restore_rng=False)
    with torch.inference_mode():
        probs, labels, meta = predict(model, data_dir, job.data.valid_split, spec, job.train.eval_batch_size)
    if labels is None:
        raise ValueError(f"{data_dir}/{job.data.valid_split} has no labels")
    return Predictions(list(spec.tasks), probs, labels, meta["_user"], meta.get("_row", np.arange(len(probs))))


__all__ = ["SearchOutcome", "check_search", "run_search", "run_trial"]
