"""Batch scoring of a request file, measured in one run, interleaved (A B C D A B C D ...), medians:

- ``in_process``: the pyfunc loaded by URI and called once on the whole pandas frame, the
  submission written with the same formatter (:func:`pipeline.predict.submission_lines`);
- ``in_process_fresh``: the same in a new interpreter (its imports of MLflow, torch and pandas
  included): what ``cli`` compares with;
- ``ray_local``: :func:`pipeline.predict.predict_file` starting its own local Ray (shut down after
  each run, so every run pays Ray's start-up, as a command does);
- ``ray_cluster``: the same joining a Ray head started once by this script (``--address``, how a
  cluster user runs it; each run connects and disconnects);
- ``cli``: ``python -m pipeline predict`` as a subprocess (interpreter, imports and a local Ray
  included): the issue's "<= 60 s" target;
- ``ray_floor``: a new interpreter that starts a local Ray as ``predict`` does, runs a Ray Data
  ``map_batches`` with a callable class on as many actors over as many tiny blocks, and shuts
  Ray down: no model, no torch, no scoring. What any Ray Data command pays before its work.

Ray's workers run at the bench's own niceness (``RAY_worker_niceness=0``, as Ray's job server
sets for jobs; Ray's default is +15): on a shared machine the scoring actors and the in-process
pyfunc then compete for the CPUs on equal terms.

    python bench/bench_predict.py --model models:/mtlrank-bench@champion --tracking-uri URI --input test_a.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_head(num_cpus: int, timeout_s: float = 120) -> Iterator[str]:
    """A Ray head (``ray start --head --block``, no dashboard) in its own process group; yields its
    address; stopped by that group (never ``ray stop``, which ends every Ray on the machine)."""
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
           "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
           "--disable-usage-stats", "--ray-client-server-port", str(_port()), "--dashboard-agent-listen-port", str(_port())]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up on port {port}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def in_process(model_uri: str, input_path: str, out: Path) -> tuple[dict[str, float], np.ndarray]:
    """The pyfunc once on the whole frame; phases timed; returns the task probabilities too."""
    import mlflow

    from pipeline.predict import submission_columns, submission_lines, write_submission

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    t["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frame = pd.read_csv(input_path, usecols=["userid", "feedid", "device"])
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = model.predict(frame)
    t["predict"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tasks = [c for c in pred.columns if c != "score"]
    keep = submission_columns({c: "int" for c in frame.columns})
    probs = pred[tasks].to_numpy()
    write_submission(out, ",".join([*keep, *tasks]), [submission_lines({c: frame[c].to_numpy() for c in keep}, probs)])
    t["write"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t, probs


class _Identity:
    """A callable class that does nothing (``ray_floor``'s map_batches)."""

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        return batch


def ray_floor(num_cpus: int) -> None:
    """Ray's fixed cost for a batch command: a local Ray started as ``predict`` starts it, a Ray
    Data ``map_batches`` with a callable class on ``num_cpus`` actors over ``4 * num_cpus`` blocks
    of 10 rows (the block count ``predict`` cuts), shutdown."""
    import pyarrow as pa
    import ray

    from pipeline.predict import BLOCKS_PER_ACTOR
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(num_cpus=num_cpus)
    blocks = [pa.table({"x": np.arange(10)}) for _ in range(BLOCKS_PER_ACTOR * num_cpus)]
    pool = ray.data.ActorPoolStrategy(size=num_cpus, max_tasks_in_flight_per_actor=1)
    ds = ray.data.from_arrow(blocks).map_batches(_Identity, batch_size=None, batch_format="pyarrow", compute=pool, num_cpus=1)
    rows = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    assert rows == 10 * len(blocks), rows
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    p.add_argument("--batch-size", type=int, default=None, help="predict's --batch-size (default: its own)")
    p.add_argument("--skip", nargs="*", default=[],
                   help="set-ups left out (in_process in_process_fresh ray_local ray_cluster cli ray_floor)")
    p.add_argument("--in-process-to", default=None, help=argparse.SUPPRESS)  # in_process_fresh's child
    p.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)  # ray_floor's child
    args = p.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.in_process_to:
        in_process(args.model, args.input, Path(args.in_process_to))
        return
    if args.floor_child:
        ray_floor(args.num_cpus)
        return
    import mlflow
    import ray

    from pipeline.predict import predict_file

    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by every raylet this run starts
    mlflow.set_tracking_uri(args.tracking_uri)
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    out: dict = {"rows": None, "num_cpus": args.num_cpus, "load_avg_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as d, ray_head(args.num_cpus) as address:
        sub = Path(d) / "submission.csv"
        reference: dict[str, np.ndarray] = {}

        def ray_run(addr: str | None) -> dict[str, float]:
            report = predict_file(args.model, args.input, sub, args.tracking_uri, num_cpus=args.num_cpus, address=addr, **extra)
            ray.shutdown()
            return {**report["timings_s"], **{f"actor_{k}": v for k, v in report["actor_timings_s"].items()}}

        def cli() -> dict[str, float]:
            cmd = [sys.executable, "-m", "pipeline", "predict", "--model", args.model, "--input", args.input,
                   "--out", str(sub), "--tracking-uri", args.tracking_uri, "--num-cpus", str(args.num_cpus)]
            cmd += [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.DEVNULL)
            return {"total": time.perf_counter() - t0}

        def fresh() -> dict[str, float]:
            cmd = [sys.executable, __file__, "--model", args.model, "--tracking-uri", args.tracking_uri,
                   "--input", args.input, "--in-process-to", str(sub)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.DEVNULL)
            return {"total": time.perf_counter() - t0}

        def floor() -> dict[str, float]:
            cmd = [sys.executable, __file__, "--model", args.model, "--tracking-uri", args.tracking_uri,
                   "--input", args.input, "--num-cpus", str(args.num_cpus), "--floor-child"]
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.DEVNULL)
            return {"total": time.perf_counter() - t0}

        def in_proc() -> dict[str, float]:
            t, reference["probs"] = in_process(args.model, args.input, sub)
            return t

        setups: dict[str, Callable[[], dict[str, float]]] = {
            "in_process": in_proc, "in_process_fresh": fresh, "ray_local": lambda: ray_run(None),
            "ray_cluster": lambda: ray_run(address), "cli": cli, "ray_floor": floor}
        setups = {k: f for k, f in setups.items() if k not in args.skip}
        for r in range(args.warmup + args.repeats):
            for name, fn in setups.items():
                load = os.getloadavg()[0]
                timings = fn()
                if name != "ray_floor":  # the floor writes no submission
                    check = pd.read_csv(sub)
                    if "probs" in reference:
                        probs = check.iloc[:, 2:].to_numpy()
                        timings["max_abs_diff_vs_in_process"] = float(np.abs(probs - reference["probs"]).max())
                    out["rows"] = len(check)
                out["runs"].append({"round": r, "warmup": r < args.warmup, "setup": name, "load_avg_1m": load,
                                    **{k: round(v, 3) for k, v in timings.items()}})
                print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    counted = [run for run in out["runs"] if not run["warmup"]]
    out["median_total_s"] = {name: statistics.median(run["total"] for run in counted if run["setup"] == name) for name in setups}
    if "in_process" in setups:
        base = out["median_total_s"]["in_process"]
        out["ratio_to_in_process"] = {name: round(v / base, 3) for name, v in out["median_total_s"].items()}
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
