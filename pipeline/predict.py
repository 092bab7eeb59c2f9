"""Batch scoring on Ray Data: a registered model over a request file -> a submission CSV.

``python -m pipeline predict --model models:/NAME@champion --input test_a.csv --out submission.csv``

The input (``userid, feedid, device``, as the challenge's ``test_a.csv``) is read and
type-checked in the driver (a bad value names file, column and row), cut into blocks, and
scored by ``map_batches`` with a callable class that loads the pyfunc once per actor. The output
has exactly the input's rows in the input's order: ``userid, feedid``, then one probability per
task of the model, with 6 decimals (the challenge scores rounded predictions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import ConfigError, OutputError

ROW = "_row"  # input row number carried through scoring to check the order
DECIMALS = 6


class BatchScorer:
    """Ray Data callable class: loads the pyfunc once, scores pandas batches.

    Args:
        model_path: a local copy of the logged model (see :func:`local_model`).
        keep: input columns copied to the output (``userid``, ``feedid``).
        torch_threads: intra-op threads per actor.
    """

    def __init__(self, model_path: str, keep: list[str], torch_threads: int = 1) -> None:
        import mlflow
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(torch_threads)
        self.model = mlflow.pyfunc.load_model(model_path)
        self.keep = keep
        self.load_s = time.perf_counter() - t0  # reported with the first block

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """One contiguous block of input rows -> one row: its first input row, its row count and
        its submission lines (formatted here, in parallel, rather than in the driver)."""
        rows = batch[ROW].to_numpy()
        if len(rows) and not (np.diff(rows) == 1).all():
            raise RuntimeError("BatchScorer: a block of non-contiguous input rows")
        t0 = time.perf_counter()
        pred = self.model.predict(batch.drop(columns=[ROW]))
        out = batch[self.keep].reset_index(drop=True)
        for t in [c for c in pred.columns if c != "score"]:
            out[t] = pred[t].to_numpy()
        text = out.to_csv(index=False, header=False, float_format=f"%.{DECIMALS}f")
        load_s, self.load_s = self.load_s, 0.0
        return pd.DataFrame({ROW: [int(rows[0]) if len(rows) else 0], "rows": [len(rows)], "header": [",".join(out.columns)],
                             "text": [text], "load_s": [load_s], "score_s": [time.perf_counter() - t0]})


def local_model(model_uri: str, tracking_uri: str | None, dst: str | Path | None = None) -> Path:
    """Download (or locate) a logged model, e.g. ``models:/NAME@champion``.

    Args:
        model_uri: any MLflow model URI; tracking_uri: the store holding the registry.
        dst: where to download (default: a temporary folder).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=None if dst is None else str(dst)))
    except MlflowException as exc:
        raise ConfigError(f"--model {model_uri!r}: {exc.message} (tracking URI {mlflow.get_tracking_uri()})") from None


def request_columns(model_path: Path) -> dict[str, str]:
    """The raw columns the model's transforms need, from its bundle."""
    layout = model_path / "artifacts" / "bundle" / "transformer" / "transformer.json"
    if not layout.is_file():
        raise ConfigError(f"{model_path}: not an mtlrank pyfunc (no {layout.relative_to(model_path)})")
    return json.loads(layout.read_text())["inputs"]


def read_requests(path: str | Path, columns: dict[str, str]) -> pa.Table:
    """The request file's columns, type-checked (file, column and row named on an error), plus ``_row``.

    Args:
        path: a CSV or Parquet file; columns: name -> ``int``/``float``/``str``.
    """
    from pipeline.datasets import FileConfig
    from pipeline.preprocess import read_source

    path = Path(path)
    return read_source(path.parent, FileConfig(path=path.name, columns=columns))


def predict_file(model_uri: str, input_path: str | Path, out_path: str | Path, tracking_uri: str | None = None,
                 num_cpus: int | None = None, address: str | None = None, batch_size: int = 50_000,
                 concurrency: int | None = None) -> dict[str, Any]:
    """Score ``input_path`` with the model on Ray Data and write the submission CSV.

    Args:
        model_uri: e.g. ``models:/mtlrank@champion``; tracking_uri: the registry's store.
        input_path: the requests; out_path: the CSV written (replaced only when complete).
        num_cpus, address: the Ray to use (see :func:`pipeline.ray_runtime.ensure_ray`).
        batch_size: rows per scoring call; concurrency: scoring actors (default: the CPUs).

    Returns:
        rows and timings (seconds) of each phase.
    """
    import ray

    from pipeline.ray_runtime import ensure_ray

    t0 = time.perf_counter()
    out_path = Path(out_path)
    if out_path.is_dir():
        raise OutputError(f"--out {out_path}: is a directory")
    model_path = local_model(model_uri, tracking_uri)
    cols = request_columns(model_path)
    table = read_requests(input_path, cols)
    timings = {"load_and_read": time.perf_counter() - t0}
    keep = [c for c in ("userid", "feedid") if c in cols] or list(cols)[:2]
    t1 = time.perf_counter()
    ensure_ray(num_cpus=num_cpus, address=address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    actors = concurrency or max(1, int(ray.available_resources().get("CPU", 1)))
    timings["ray_init"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    n = table.num_rows
    step = max(1, min(batch_size, -(-n // actors)))
    blocks = [table.slice(s, step) for s in range(0, n, step)]
    ds = ray.data.from_arrow(blocks).map_batches(
        BatchScorer, fn_constructor_kwargs={"model_path": str(model_path), "keep": keep}, batch_size=None,
        batch_format="pandas", concurrency=actors, num_cpus=1,
    )
    chunks = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    timings["score"] = time.perf_counter() - t2
    first = table[ROW][0].as_py() if n else 1
    starts = np.cumsum(np.r_[first, chunks["rows"].to_numpy()[:-1]]) if len(chunks) else np.zeros(0)
    if int(chunks["rows"].sum()) != n or not np.array_equal(chunks[ROW].to_numpy(), starts):
        raise RuntimeError(f"scored blocks out of order or incomplete: {int(chunks['rows'].sum())} of {n} rows")
    t3 = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(chunks["header"].iloc[0] + "\n")
        for text in chunks["text"]:
            fh.write(text)
    tmp.replace(out_path)
    timings["write"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return {"rows": n, "actors": actors, "columns": chunks["header"].iloc[0].split(","), "out": str(out_path.resolve()),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "actor_timings_s": {"model_load_max": round(float(chunks["load_s"].max()), 3),
                                "predict_and_format_sum": round(float(chunks["score_s"].sum()), 3)}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.preprocess import positive_int
    from pipeline.serve.registry import tracking_uri_arg

    parser.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    parser.add_argument("--input", required=True, help="request rows (CSV/Parquet with userid, feedid, device)")
    parser.add_argument("--out", required=True, help="submission CSV written")
    tracking_uri_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=50_000, help="rows per scoring call")
    parser.add_argument("--concurrency", type=positive_int, default=None, help="scoring actors (default: Ray's CPUs)")
    parser.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    report = predict_file(args.model, args.input, args.out, args.tracking_uri, args.num_cpus, args.address,
                          args.batch_size, args.concurrency)
    print(json.dumps(report, indent=2))
    return 0

