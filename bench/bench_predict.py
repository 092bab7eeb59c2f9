"""Batch scoring of a request file: the pyfunc called once in-process on the whole pandas
frame vs ``python -m pipeline predict`` (Ray Data ``map_batches``), measured in one run.

    python bench/bench_predict.py --model models:/mtlrank-bench@champion --tracking-uri URI --input test_a.csv
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    import mlflow

    from pipeline.predict import predict_file

    out: dict = {"load_avg_before": os.getloadavg()}
    mlflow.set_tracking_uri(args.tracking_uri)
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(args.model)
    out["in_process_load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    frame = pd.read_csv(args.input, usecols=["userid", "feedid", "device"])
    out["in_process_read_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    pred = model.predict(frame)
    out["in_process_predict_s"] = round(time.perf_counter() - t0, 2)
    out["rows"] = len(frame)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        report = predict_file(args.model, args.input, Path(d) / "submission.csv", args.tracking_uri, num_cpus=args.num_cpus)
        out["ray_predict_wall_s"] = round(time.perf_counter() - t0, 2)
        out["ray_predict"] = report
        sub = pd.read_csv(Path(d) / "submission.csv")
    tasks = [c for c in pred.columns if c != "score"]
    out["max_abs_diff_vs_in_process"] = float(np.abs(sub[tasks].to_numpy() - pred[tasks].to_numpy()).max())
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
