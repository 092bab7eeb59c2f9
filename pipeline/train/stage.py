"""``python -m pipeline train --config configs/train/NAME.yaml --data DIR [--out DIR] [--set k=v]``:
data-parallel training on Ray Train (a local Ray by default, a cluster with ``--address`` or
under ``ray job submit``), logged to MLflow (``<out>/mlflow.db`` by default)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.config import load_config
from pipeline.train.config import TrainJobConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "mmoe.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="train config YAML (default: %(default)s)")
    parser.add_argument("--data", required=True, help="a preprocess output folder (has _SUCCESS, train/, valid/)")
    parser.add_argument("--out", default="runs/train", help="run folder: MLflow store, artifacts, Ray storage (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray (default: all)")
    parser.add_argument("--object-store-gb", type=float, default=None,
                        help="object store of a new local Ray in GB (default: Ray's); smaller spills large shards to disk sooner")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.ray_train import run_train

    job = load_config(TrainJobConfig, _resolve(args.config), args.set)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Work from --out: MLflow's sqlite store resolves its default artifact root against the
    # working directory, and a Ray job's working directory is a temporary copy that can vanish
    # while the job runs (seen on a simulated two-node cluster sharing one disk).
    os.chdir(out)
    store = int(args.object_store_gb * 2**30) if args.object_store_gb else None
    outcome = run_train(job, data, out, address=args.address, num_cpus=args.num_cpus, object_store_memory=store)
    keys = sorted(k for k in outcome.metrics if k.endswith("/score") or "/uauc_" in k)
    width = max((len(k) for k in keys), default=0)
    for k in keys:
        print(f"{k:<{width}}  {outcome.metrics[k]:.6f}")
    print(f"steps {int(outcome.metrics.get('train/steps', 0))}; MLflow run {outcome.run_id} in {outcome.tracking_uri}")
    print(f"checkpoint: {outcome.checkpoint_path}")
    return 0


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[2] / p  # relative to the project (ray job submit copies)
