"""``python -m pipeline fuse --predictions FILE [--config configs/fuse/NAME.yaml] [--out DIR]``:
tune the fusion weights of the ranking score on saved validation predictions, no retraining.

The ranking score fuses the per-task probabilities (:func:`mtl.fusion.fuse`: weighted sum,
weighted product or weighted rank). Ray Tune searches one weight per task to maximise the
business objective ``sum_a c_a * uAUC_a(fused score) / sum_a c_a`` (``c``: the business weights,
by default the challenge's 4:3:2:1:1:1:1), optionally subject to a floor on some actions' uAUC
(a trial under a floor scores ``objective - penalty * shortfall``; the best trial is the best
feasible one). The fused score is a ranking score, not a submitted probability, so its uAUC is
computed without the official 6-decimal rounding (rounding a weighted product of small
probabilities would make ties that no ranker has).

Reported against equal weights; MLflow gets the best weights, both objectives, the per-action
uAUCs, the trial table and a trade-off plot (each action's uAUC as one action's share of the
weights moves from 0 to 1, the others keeping their proportions).

Predictions files (:func:`save_predictions`): :class:`pipeline.valid_predictions.Predictions`'
Parquet layout (the report's too); ``python -m pipeline tune`` writes one for its best trial.

Example:
    >>> # preds = load_predictions("runs/tune/predictions/valid.parquet")
    >>> # run_fusion(preds, FuseConfig(), "runs/fuse").best_weights
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from mtl.fusion import FUSIONS, fuse
from mtl.metrics import WECHAT_ACTION_WEIGHTS, user_auc, weighted_score
from pipeline.errors import ConfigError, DataError
from pipeline.tune.space import Domain, SearchSection, SpaceSampler, Strict, make_searcher
from pipeline.valid_predictions import Predictions

METRIC = "score"


class FuseMlflow(Strict):
    #: default: sqlite:///<out>/mlflow.db
    tracking_uri: str | None = None
    experiment: str = "mtlrank-fuse"
    run_name: str | None = None


class FuseConfig(Strict):
    """A fusion-weight search: the fusion, the business objective and the searcher."""

    method: str = "weighted_product"
    #: c_a of the objective, one per task of the predictions (>= 0, not all 0)
    business_weights: dict[str, float] = Field(default_factory=lambda: dict(WECHAT_ACTION_WEIGHTS))
    #: uAUC floors per action (optional): trials below a floor are infeasible
    floors: dict[str, float] = Field(default_factory=dict)
    #: an infeasible trial scores objective - penalty * (sum of its shortfalls below the floors)
    penalty: float = Field(10.0, gt=0)
    #: the range each task's (unnormalised) weight is searched in
    weight_high: float = Field(1.0, gt=0)
    search: SearchSection = Field(default_factory=lambda: SearchSection(num_samples=200, max_concurrent=2))
    #: CPUs of one fusion trial (a few uAUCs over the validation rows)
    cpus_per_trial: float = Field(0.5, gt=0)
    #: points per action in the trade-off plot
    sweep_points: int = Field(21, ge=3)
    mlflow: FuseMlflow = Field(default_factory=FuseMlflow)

    @model_validator(mode="after")
    def _check(self) -> "FuseConfig":
        if self.search.algorithm == "grid":
            raise ValueError("search.algorithm: the fusion weights are searched with optuna or random, not grid")
        if self.method not in FUSIONS:
            raise ValueError(f"method {self.method!r} unknown; registered: {sorted(FUSIONS)}")
        bad = {a: c for a, c in self.business_weights.items() if not (c >= 0 and math.isfinite(c))}
        if bad or not any(c > 0 for c in self.business_weights.values()):
            raise ValueError(f"business_weights must be finite, >= 0 and not all 0, got {self.business_weights}")
        bad = {a: f for a, f in self.floors.items() if not 0.0 <= f <= 1.0}
        if bad:
            raise ValueError(f"floors are uAUCs in [0, 1], got {bad}")
        return self

    def check_tasks(self, tasks: list[str]) -> None:
        """Every task has a business weight, and the weights and floors name only tasks."""
        missing = [t for t in tasks if t not in self.business_weights]
        extra = sorted((set(self.business_weights) | set(self.floors)) - set(tasks))
        if missing or extra:
            raise ConfigError(f"fuse: the predictions' tasks are {tasks}; "
                              + (f"no business weight for {missing}" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"business_weights/floors name unknown actions {extra}" if extra else ""))


# ---------------------------------------------------------------------- predictions


def save_predictions(preds: Predictions, path: str | Path) -> Path:
    """Write ``preds`` as Parquet (:mod:`pipeline.valid_predictions`' layout)."""
    return preds.save(path)


def load_predictions(path: str | Path) -> Predictions:
    """Read what :func:`save_predictions` wrote; bad files fail with their name and column, and
    so do non-finite probabilities (a fused score of NaN ranks nothing)."""
    preds = Predictions.load(path)
    bad = [t for k, t in enumerate(preds.tasks) if not np.isfinite(preds.probs[:, k]).all()]
    if bad:
        raise DataError(f"{path}: non-finite probabilities in {bad}")
    return preds


# ---------------------------------------------------------------------- the objective


def evaluate_weights(preds: Predictions, weights: list[float] | np.ndarray, cfg: FuseConfig) -> dict[str, float]:
    """The fused score's uAUC per action (``uauc/<task>``), the business ``objective`` (over the
    actions some user has both labels of; the others have no uAUC), ``feasible`` (every floor
    met) and the searched ``score``."""
    scores = fuse(preds.probs, weights, cfg.method)
    uaucs = {t: user_auc(preds.labels[:, k], scores, preds.users, decimals=None) for k, t in enumerate(preds.tasks)}
    scored = {t: u for t, u in uaucs.items() if not math.isnan(u)}
    objective = weighted_score(scored, {t: cfg.business_weights[t] for t in scored}) if scored else float("nan")
    shortfall = sum(max(0.0, floor - uaucs[a]) for a, floor in cfg.floors.items())
    return {"objective": objective, "feasible": float(shortfall == 0.0), "shortfall": shortfall,
            METRIC: objective - cfg.penalty * shortfall, **{f"uauc/{t}": u for t, u in uaucs.items()}}


def _trial(config: dict[str, Any], preds: Predictions, cfg: FuseConfig) -> None:
    """One fusion trial: evaluate the drawn weights, report to Tune."""
    from ray import tune

    tune.report(evaluate_weights(preds, [config[f"w.{t}"] for t in preds.tasks], cfg))


def sweep(preds: Predictions, weights: np.ndarray, cfg: FuseConfig) -> dict[str, Any]:
    """For each action ``a``: its share of the (normalised) weights from 0 to 1, the others
    keeping their proportions; each action's uAUC and the objective at every share."""
    w = np.asarray(weights, dtype=np.float64) / max(float(np.sum(weights)), 1e-12)
    shares = np.linspace(0.0, 1.0, cfg.sweep_points)
    out: dict[str, Any] = {"shares": shares.tolist(), "best": dict(zip(preds.tasks, w.tolist())), "moves": {}}
    for k, task in enumerate(preds.tasks):
        rest = np.delete(w, k)
        rest = rest / rest.sum() if rest.sum() > 0 else np.full(len(rest), 1.0 / max(len(rest), 1))
        curves: dict[str, list[float]] = {t: [] for t in [*preds.tasks, "objective"]}
        for s in shares:
            m = evaluate_weights(preds, np.insert(rest * (1.0 - s), k, s), cfg)
            for t in preds.tasks:
                curves[t].append(m[f"uauc/{t}"])
            curves["objective"].append(m["objective"])
        out["moves"][task] = curves
    return out


def tradeoff_figure(data: dict[str, Any]) -> Any:
    """One panel per moved action: every action's uAUC and the objective against its share."""
    from pipeline.train.plots import pyplot

    plt = pyplot()
    tasks = list(data["moves"])
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, moved in zip(axes.flat, tasks):
        curves = data["moves"][moved]
        for t in tasks:
            ax.plot(data["shares"], curves[t], label=t, lw=2.2 if t == moved else 1.0)
        ax.plot(data["shares"], curves["objective"], "k--", label="objective", lw=1.5)
        ax.axvline(data["best"][moved], color="grey", ls=":", lw=1)
        ax.set(title=f"moving {moved}", xlabel=f"share of {moved}", ylabel="uAUC of the fused score")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- the search


@dataclass
class FuseOutcome:
    #: the best weights, normalised to sum to 1
    best_weights: dict[str, float]
    best: dict[str, float]
    equal: dict[str, float]
    run_id: str
    tracking_uri: str
    trials: Any  # pandas.DataFrame


def run_fusion(preds: Predictions, cfg: FuseConfig, out: str | Path, tracking_uri: str | None = None,
               parent_run_id: str | None = None, experiment: str | None = None) -> FuseOutcome:
    """Search the fusion weights with Ray Tune (Ray must be running) and log to MLflow: a run
    of its own, or a nested run under ``parent_run_id`` (the search's)."""
    from ray import tune

    from pipeline.tracking import RunLogger, resolve_tracking_uri, tracked_run

    cfg.check_tasks(preds.tasks)
    unscored = [t for t in preds.tasks if math.isnan(evaluate_weights(preds, [1.0] * len(preds.tasks), cfg)[f"uauc/{t}"])]
    if len(unscored) == len(preds.tasks) or set(cfg.floors) & set(unscored):
        raise DataError(f"no user has both labels of {unscored} in the predictions: their uAUC is undefined "
                        + ("(and they have floors)" if set(cfg.floors) & set(unscored) else "(every action)"))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or resolve_tracking_uri(cfg.mlflow.tracking_uri, out)
    equal_w = [1.0 / len(preds.tasks)] * len(preds.tasks)
    sampler = SpaceSampler({f"w.{t}": Domain(type="float", low=0.0, high=cfg.weight_high) for t in preds.tasks}, {})
    start = {f"w.{t}": cfg.weight_high / 2 for t in preds.tasks}  # equal weights, first
    searcher = make_searcher(sampler, cfg.search, METRIC, "max", points_to_evaluate=[start])
    with tracked_run(uri, experiment or cfg.mlflow.experiment, run_name=cfg.mlflow.run_name or f"fuse-{cfg.method}",
                     artifact_root=out / "mlartifacts", parent_run_id=parent_run_id) as run_id:
        log = RunLogger(uri, run_id)
        log.params({"method": cfg.method, "algorithm": cfg.search.algorithm, "num_samples": cfg.search.num_samples,
                    "seed": cfg.search.seed, "rows": len(preds.users), "tasks": ",".join(preds.tasks),
                    "unscored": ",".join(unscored) or "-",
                    **{f"c.{t}": cfg.business_weights[t] for t in preds.tasks},
                    **{f"floor.{a}": f for a, f in cfg.floors.items()}})
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, preds=preds, cfg=cfg), {"cpu": cfg.cpus_per_trial}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.search.num_samples,
                                        max_concurrent_trials=cfg.search.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=f"fuse-{run_id[:12]}", storage_path=str(out / "tune"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        table = grid.get_dataframe()
        if grid.errors:
            raise RuntimeError(f"{len(grid.errors)} fusion trial(s) failed: {grid.errors[0]}")
        columns = [f"config/w.{t}" for t in preds.tasks]
        feasible = table[table["feasible"] > 0]
        pick = (feasible if len(feasible) else table)[METRIC].idxmax()
        raw = table.loc[pick, columns].to_numpy(dtype=np.float64)
        total = float(raw.sum())
        best_w = raw / total if total > 0 else np.asarray(equal_w)
        best = evaluate_weights(preds, best_w, cfg)
        equal = evaluate_weights(preds, equal_w, cfg)
        log.metrics({**{f"best/{k}": v for k, v in best.items()}, **{f"equal/{k}": v for k, v in equal.items()},
                     **{f"weight/{t}": float(w) for t, w in zip(preds.tasks, best_w)}}, step=0)
        weights = dict(zip(preds.tasks, best_w.tolist()))
        log.dict({"method": cfg.method, "weights": weights, "best": best, "equal": equal,
                  "equal_weights": dict(zip(preds.tasks, equal_w))}, "fusion.json")
        with tempfile.TemporaryDirectory() as d:
            table.to_csv(Path(d) / "fusion_trials.csv", index=False)
            log.artifact(Path(d) / "fusion_trials.csv")
        curves = sweep(preds, best_w, cfg)
        log.dict(curves, "tradeoff.json")
        fig = tradeoff_figure(curves)
        log.figure(fig, "tradeoff.png")
        from pipeline.train.plots import close_all

        close_all({"tradeoff.png": fig})
    return FuseOutcome(weights, best, equal, run_id, uri, table)


def report_lines(outcome: FuseOutcome, tasks: list[str]) -> list[str]:
    """The best weights against equal weights, one action a line."""
    lines = [f"{'action':<14} {'weight':>8} {'uAUC best':>10} {'uAUC equal':>11}"]
    for t in tasks:
        lines.append(f"{t:<14} {outcome.best_weights[t]:>8.4f} {outcome.best[f'uauc/{t}']:>10.6f} {outcome.equal[f'uauc/{t}']:>11.6f}")
    lines.append(f"{'objective':<14} {'':>8} {outcome.best['objective']:>10.6f} {outcome.equal['objective']:>11.6f}"
                 + ("" if outcome.best["feasible"] else "   (no trial met every floor)"))
    lines.append(f"MLflow run {outcome.run_id} in {outcome.tracking_uri}")
    return lines


# ---------------------------------------------------------------------- the stage


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fuse" / "default.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_run_arguments

    parser.add_argument("--predictions", required=True,
                        help="validation predictions Parquet (python -m pipeline tune writes <out>/predictions/valid.parquet)")
    add_run_arguments(parser, str(DEFAULT_CONFIG), "runs/fuse", "MLflow store, artifacts, Tune storage")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, resolve_config_path
    from pipeline.ray_runtime import ensure_ray

    cfg = load_config(FuseConfig, resolve_config_path(args.config), args.set)
    preds = load_predictions(args.predictions)
    cfg.check_tasks(preds.tasks)  # before Ray starts
    ensure_ray(num_cpus=args.num_cpus, address=args.address)
    outcome = run_fusion(preds, cfg, args.out)
    print("\n".join(report_lines(outcome, preds.tasks)))
    return 0
