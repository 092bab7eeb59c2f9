"""``python -m pipeline tune --config configs/tune/NAME.yaml --data DIR [--out DIR] [--set k=v]``:
a Ray Tune search over train jobs (architecture, expert counts, learning rate, batch size,
balancing strategy), each trial a distributed Ray Train run, ASHA on the validation score,
logged to MLflow (``<out>/mlflow.db`` by default). Run the same command again to resume an
interrupted search."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_config, resolve_config_path
from pipeline.tune.config import TuneConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tune" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_run_arguments

    parser.add_argument("--data", required=True, help="a preprocess output folder (has _SUCCESS, train/, valid/)")
    add_run_arguments(parser, str(DEFAULT_CONFIG), "runs/tune", "MLflow store, artifacts, Tune and Train storage; "
                      "an interrupted search in it is resumed")


def run(args: argparse.Namespace) -> int:
    from pipeline.fuse import report_lines
    from pipeline.tune.search import run_search

    cfg = load_config(TuneConfig, resolve_config_path(args.config), args.set)
    outcome = run_search(cfg, args.data, args.out, address=args.address, num_cpus=args.num_cpus)
    if outcome.interrupted:
        print(f"search interrupted; run the same command again to resume it ({outcome.experiment_path})")
        return 130
    results = outcome.results
    print(results["status"].value_counts().to_string())
    if outcome.best is None:
        print(f"no trial reported {cfg.metric}; MLflow run {outcome.parent_run_id} in {outcome.tracking_uri}")
        return 1
    print(f"best trial {outcome.best['trial_id']}: {cfg.metric} {outcome.best[cfg.metric]:.6f}")
    print(f"best config: {outcome.best_config_path} (python -m pipeline train --config {outcome.best_config_path} --data {args.data})")
    print(f"validation predictions: {outcome.predictions_path}")
    if outcome.fusion is not None:
        print("\n".join(report_lines(outcome.fusion, list(outcome.fusion.best_weights))))
    print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    return 0
