"""Latency of ``mlflow models serve`` (``--env-manager local``, 127.0.0.1, one worker) for
1-row and 1,000-row requests: p50 / p99 over ``--repeats`` requests each after a warm-up.

    python bench/bench_serve.py --model models:/mtlrank-bench@champion --tracking-uri URI --requests test_a.csv
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd


def post(url: str, frame: pd.DataFrame) -> float:
    """Seconds for one ``/invocations`` call (the answer must be 200 with one row per request row)."""
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    dt = time.perf_counter() - t0
    assert len(out["predictions"]) == len(frame)
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--requests", required=True, help="CSV of raw request rows (userid, feedid, device)")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = pd.read_csv(args.requests, usecols=["userid", "feedid", "device"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": args.tracking_uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    t_start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.3)
        startup = time.perf_counter() - t_start
        rng = np.random.default_rng(args.seed)
        result = {"server_start_s": round(startup, 2), "load_avg_before": os.getloadavg()}
        for n in (1, 1000):
            for _ in range(5):  # warm-up
                post(url + "/invocations", rows.sample(n, random_state=int(rng.integers(1 << 31))))
            times = [post(url + "/invocations", rows.sample(n, random_state=int(rng.integers(1 << 31))))
                     for _ in range(args.repeats)]
            ms = np.array(times) * 1000
            result[f"rows_{n}"] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                                   "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(ms)}
        result["load_avg_after"] = os.getloadavg()
        print(json.dumps(result, indent=2))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
