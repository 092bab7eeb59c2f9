"""The end-to-end demo: generate WeChat-format logs -> preprocess on Ray Data -> train a
multi-task model -> score the validation day with the official metric, next to the oracle's
score (the true probabilities the generator planted: the best any model could do).

Everything is recorded in one MLflow run: the resolved config (``config.yaml``), parameters,
the training loss curves (metrics and a ``loss_curves.png`` artifact) and the final metrics.

``python -m pipeline demo --out runs/demo [--config configs/demo.yaml] [--set train.epochs=3]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtl.precision import resolve_compute_dtype
from pipeline.config import dump_config, load_config
from pipeline.train import TrainConfig, predict, train_local
from pipeline.train.evaluate import oracle_metrics

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = None  # default: sqlite:///<out>/mlflow.db
    experiment: str = "mtlrank-demo"


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: Literal["tiny", "small", "full"] = "tiny"
    seed: int = 0
    dataset_config: str = "configs/datasets/wechat.yaml"
    dataset_overrides: list[str] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def run_demo(cfg: DemoConfig, out: str | Path) -> dict[str, float]:
    """Run every stage into ``out`` and return the final metrics."""
    import mlflow

    from pipeline.datasets import DatasetConfig
    from pipeline.generate import generate
    from pipeline.preprocess import preprocess

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw, processed = out / "raw", out / "processed"
    timings: dict[str, float] = {}
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri or f"sqlite:///{out / 'mlflow.db'}")
    mlflow.set_experiment(cfg.mlflow.experiment)
    from pipeline.tracking import sigterm_as_interrupt

    # killed (SIGTERM, Ctrl-C): the run ends FAILED rather than staying RUNNING
    with sigterm_as_interrupt(), mlflow.start_run(run_name=f"demo-{cfg.scale}-{cfg.train.model.name}-{cfg.train.strategy.name}"):
        mlflow.log_text(dump_config(cfg), "config.yaml")
        mlflow.log_params({
            "scale": cfg.scale, "seed": cfg.seed, "model": cfg.train.model.name,
            "strategy": cfg.train.strategy.name, "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs, "lr": cfg.train.optimizer.lr, "precision": cfg.train.precision,
            # what "auto" meant on this machine (the trainer runs on the CPU)
            "compute_dtype": str(resolve_compute_dtype(cfg.train.precision, torch.device("cpu"), torch.float32)),
            **{f"model.{k}": v for k, v in cfg.train.model.params.items()},
        })
        t = time.perf_counter()
        generate(raw, scale=cfg.scale, seed=cfg.seed)
        timings["generate_s"] = time.perf_counter() - t

        t = time.perf_counter()
        dataset_cfg = load_config(DatasetConfig, _resolve(cfg.dataset_config), cfg.dataset_overrides)
        report = preprocess(dataset_cfg, raw, processed)
        mlflow.log_dict(report, "preprocess_report.json")
        timings["preprocess_s"] = time.perf_counter() - t

        t = time.perf_counter()
        result = train_local(
            cfg.train, processed,
            on_log=lambda step, rec: mlflow.log_metrics({k: v for k, v in rec.items() if "/" in k}, step=step),
        )
        timings["train_s"] = time.perf_counter() - t

        probs, labels, meta = predict(result.model, processed, "valid", result.spec)
        assert labels is not None
        metrics = dict(result.metrics)
        metrics.update(oracle_metrics(raw, meta, labels, result.spec.tasks))
        if "valid/score" in metrics and "oracle/score" in metrics:
            metrics["valid/score_gap_to_oracle"] = metrics["oracle/score"] - metrics["valid/score"]
        metrics.update(timings)
        mlflow.log_metrics(metrics)
        _log_loss_curves(result.history, result.spec.tasks)
        _log_routing_heatmaps(result.model, processed, result.spec)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _log_loss_curves(history: list[dict[str, float]], tasks: list[str]) -> None:
    import mlflow

    from pipeline.train import plots

    figures = plots.loss_curves(history, tasks)
    for path, fig in figures.items():
        mlflow.log_figure(fig, path)
    plots.close_all(figures)


def _log_routing_heatmaps(model: Any, data_dir: Path, spec: Any) -> None:
    """One heatmap per routing tensor (tasks x experts) as an MLflow artifact, with its numbers."""
    import mlflow

    from pipeline.data import iter_local_batches
    from pipeline.train import plots
    from pipeline.train.evaluate import mean_routing

    routing = mean_routing(model, iter_local_batches(data_dir, "valid", 8192, spec=spec))
    figures = plots.routing_heatmaps(routing, spec.tasks)
    for path, fig in figures.items():
        mlflow.log_figure(fig, path)
    plots.close_all(figures)
    for name, mean in routing.items():
        mlflow.log_dict({"tasks": spec.tasks, "mean": mean.tolist()}, f"routing_{name}.json")


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parent.parent / p  # relative to the project (ray job submit copies)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config YAML (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DemoConfig, args.config, args.set)
    metrics = run_demo(cfg, args.out)
    keys = sorted(k for k in metrics if k.startswith(("valid/uauc", "valid/score", "oracle/score")))
    width = max(len(k) for k in keys) if keys else 0
    for k in keys:
        print(f"{k:<{width}}  {metrics[k]:.6f}")
    print(f"wrote {Path(args.out).resolve()} (metrics.json, mlflow.db)")
    return 0
