"""Register a model for the serving/scoring benches: trained in-process for ``--steps`` steps
(``train_local``), or ``--untrained`` (seeded initial weights: same cost per row, no training
time; for data too large to hold in memory here).

    python bench/serve_model.py --data PROCESSED --tracking-uri sqlite:////tmp/b/mlflow.db --name mtlrank-bench [--untrained]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.data import load_spec
from pipeline.serve import write_model_dir
from pipeline.serve.registry import register_model
from pipeline.train import TrainConfig, build, train_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--name", default="mtlrank-bench")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--untrained", action="store_true")
    args = p.parse_args()
    cfg = TrainConfig(epochs=1, max_steps=args.steps, batch_size=2048)
    t0 = time.perf_counter()
    if args.untrained:
        model, spec = build(cfg, load_spec(args.data)).model, load_spec(args.data)
    else:
        result = train_local(cfg, args.data)
        model, spec = result.model, result.spec
    with tempfile.TemporaryDirectory() as d:
        write_model_dir(Path(d) / "model", model, spec, cfg)
        reg = register_model(Path(d) / "model", args.data, args.name, args.tracking_uri)
    print(json.dumps({**asdict(reg), "seconds": round(time.perf_counter() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
