"""Batch scoring on Ray Data: a registered model over a request file -> a submission CSV.

``python -m pipeline predict --model models:/NAME@champion --input test_a.csv --out submission.csv``

Start-up is most of a run on a small machine, so its parts overlap: a thread finds the model
(MLflow), reads and type-checks the input (a bad value names file, column and row) while Ray
starts; then one task on this node loads the model's bundle (the
:class:`~pipeline.serve.scorer.Scorer` the pyfunc wraps) into the object store while Ray Data
starts the scoring actors of ``map_batches`` (a callable class holding the loaded model), which
import torch meanwhile and take the loaded model with one ``ray.get`` (its history tables are
numpy arrays, read in place from shared memory) instead of each reading the bundle from disk.
The driver never imports torch. A local Ray is started lean (no dashboard: batch scoring needs
no State API). Each actor scores one contiguous block of rows and formats its submission lines
(vectorised, see :func:`submission_lines`); the driver writes them in the input's order.

The output has exactly the input's rows in the input's order: ``userid, feedid``, then one
probability per task of the model, with 6 decimals (the challenge scores rounded predictions).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, OutputError

ROW = "_row"  # input row number carried through scoring to check the order
DECIMALS = 6
BLOCKS_PER_ACTOR = 4  # blocks the input is cut into per scoring actor (see _score)


def fixed_decimals(values: np.ndarray, decimals: int = DECIMALS) -> pa.Array:
    """Numbers in ``[0, 1]`` as strings with exactly ``decimals`` decimals (``"%.6f"``), vectorised.

    Rounds ``values * 10**decimals`` to the nearest integer (ties to even), which is ``"%.6f"``
    except where ``value * 10**6`` lies within a rounding error of a tie (a last digit 1e-6
    apart, both correct 6-decimal roundings of the value).

    Args:
        values: finite numbers in ``[0, 1]`` (probabilities).

    Raises:
        ValueError: a value is not finite or outside ``[0, 1]`` (no probability).
    """
    values = np.asarray(values, dtype=np.float64)
    bad = ~((values >= 0.0) & (values <= 1.0))  # NaN is bad too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} value(s) are no probability, e.g. row {i}: {values[i]!r}")
    scale = 10**decimals
    fixed = np.rint(values * scale).astype(np.int64)
    whole = pc.cast(pa.array(fixed // scale), pa.string())
    frac = pc.utf8_lpad(pc.cast(pa.array(fixed % scale), pa.string()), decimals, "0")
    return pc.binary_join_element_wise(whole, frac, ".")


def submission_lines(keep: dict[str, np.ndarray], probs: np.ndarray, decimals: int = DECIMALS) -> str:
    """CSV lines without a header: the ``keep`` columns (integers, as they are), then ``probs``'
    columns with ``decimals`` decimals; every line ends in a newline. The text of pandas'
    ``to_csv(header=False, index=False, float_format="%.6f")`` (see :func:`fixed_decimals`),
    built by Arrow kernels (pandas' formatter was a third of a scoring actor's time).

    Args:
        keep: integer columns copied from the input (``userid``, ``feedid``), in order.
        probs: ``[N, K]`` probabilities.
    """
    if len(probs) == 0:
        return ""
    cols = [pc.cast(pa.array(np.asarray(v)), pa.string()) for v in keep.values()]
    cols += [fixed_decimals(probs[:, k], decimals) for k in range(probs.shape[1])]
    cols[-1] = pc.binary_join_element_wise(cols[-1], "\n", "")
    lines = pc.cast(pc.binary_join_element_wise(*cols, ","), pa.large_string())
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], pa.int64()), lines)
    return pc.binary_join(whole, pa.scalar("", pa.large_string()))[0].as_py()


class BatchScorer:
    """Ray Data callable class: holds the loaded model, scores contiguous blocks of request rows.

    Args:
        scorer: the loaded :class:`~pipeline.serve.scorer.Scorer`, or an object-store reference
            to it (:func:`predict_file` shares one copy among the actors this way).
        keep: input columns copied to the output (``userid``, ``feedid``).
        torch_threads: intra-op threads per actor.
    """

    def __init__(self, scorer: Any, keep: list[str] | None = None, torch_threads: int = 1) -> None:
        self.born = time.time()  # wall clock: the driver compares it with its own (one machine)
        import ray
        import torch

        torch.set_num_threads(torch_threads)
        if isinstance(scorer, ray.ObjectRef):
            scorer = ray.get(scorer)
        self.scorer = scorer
        self.keep = list(keep or [])
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """One contiguous block of input rows (Arrow) -> one row: its first input row, its row
        count, its submission lines (formatted here, in parallel, rather than in the driver) and
        when the actor started, had the model, began and ended the block (wall-clock seconds)."""
        start = time.time()
        rows = batch[ROW].to_numpy()
        if len(rows) and not (np.diff(rows) == 1).all():
            raise RuntimeError("BatchScorer: a block of non-contiguous input rows")
        probs = self.scorer.predict_table(batch.select(list(self.scorer.request_columns)))
        text = submission_lines({c: batch[c].to_numpy() for c in self.keep}, probs)
        header = ",".join([*self.keep, *self.scorer.spec.tasks])
        return {ROW: np.array([int(rows[0]) if len(rows) else 0]), "rows": np.array([len(rows)]),
                "header": np.array([header], dtype=object), "text": np.array([text], dtype=object),
                **{k: np.array([v]) for k, v in (("born", self.born), ("ready", self.ready), ("start", start),
                                                 ("end", time.time()))}}


def load_scorer(model_path: str | Path) -> Any:
    """The :class:`~pipeline.serve.scorer.Scorer` inside a logged mtlrank pyfunc (what its
    ``predict`` calls), read without MLflow.

    Args:
        model_path: a local copy of the logged model (see :func:`local_model`).
    """
    from pipeline.serve.scorer import Scorer

    return Scorer.load(bundle_dir(model_path))


def bundle_dir(model_path: str | Path) -> Path:
    """The bundle folder inside a logged mtlrank pyfunc.

    Raises:
        ConfigError: the model is no mtlrank pyfunc.
    """
    from pipeline.serve import BUNDLE

    bundle = Path(model_path) / "artifacts" / BUNDLE
    if not bundle.is_dir():
        raise ConfigError(f"{model_path}: not an mtlrank pyfunc (no artifacts/{BUNDLE})")
    return bundle


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


def write_submission(out_path: str | Path, header: str, texts: Any) -> Path:
    """Write the header line then the text chunks, in order, to a temporary file that replaces
    ``out_path`` only when complete.

    Args:
        out_path: the CSV; header: its first line (no newline); texts: strings of whole lines.
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(header + "\n")
        for text in texts:
            fh.write(text)
    return tmp.replace(out_path)


def submission_columns(columns: dict[str, str]) -> list[str]:
    """The input columns a submission repeats: ``userid, feedid`` (else the first two).

    Args:
        columns: the model's request columns (:func:`request_columns`).
    """
    return [c for c in ("userid", "feedid") if c in columns] or list(columns)[:2]


def predict_file(model_uri: str, input_path: str | Path, out_path: str | Path, tracking_uri: str | None = None,
                 num_cpus: int | None = None, address: str | None = None, batch_size: int = 250_000,
                 concurrency: int | None = None, threads_per_actor: int = 1) -> dict[str, Any]:
    """Score ``input_path`` with the model on Ray Data and write the submission CSV.

    Args:
        model_uri: e.g. ``models:/mtlrank@champion``; tracking_uri: the registry's store.
        input_path: the requests; out_path: the CSV written (replaced only when complete).
        num_cpus, address: the Ray to use (see :func:`pipeline.ray_runtime.ensure_ray`).
        batch_size: at most this many rows per scoring call (the input is cut into
            :data:`BLOCKS_PER_ACTOR` blocks per actor, smaller ones if this says so);
            concurrency: scoring actors (default: the cluster's free CPUs / ``threads_per_actor``).
            threads_per_actor: CPUs each scoring actor holds and torch's intra-op threads in it
                (fewer actors start faster; more score more blocks at once).

    Returns:
        rows and timings (seconds) of each phase.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    if out_path.is_dir():
        raise OutputError(f"--out {out_path}: is a directory")
    with ThreadPoolExecutor(max_workers=1) as pool:
        located = pool.submit(_locate_and_read, model_uri, tracking_uri, input_path)
        _start_ray(num_cpus, address, located)  # meanwhile
        model_path, cols, table = located.result()
    timings = {"ray_init_locate_and_read": time.perf_counter() - t0}
    _check_threads(threads_per_actor)
    scorer = _load_on_this_node(model_path)
    actors = concurrency or max(1, int(ray_cpus()) // threads_per_actor)
    t2, began = time.perf_counter(), time.time()
    chunks = _score(table, scorer, submission_columns(cols), actors, batch_size, threads_per_actor)
    timings["score"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    write_submission(out_path, chunks["header"].iloc[0], chunks["text"])
    timings["write"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return {"rows": table.num_rows, "actors": actors, "threads_per_actor": threads_per_actor, "columns": chunks["header"].iloc[0].split(","),
            "out": str(out_path.resolve()), "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "actor_timings_s": actor_timings(chunks, began)}


def actor_timings(chunks: pd.DataFrame, began: float) -> dict[str, float]:
    """Where the scoring phase went (seconds): actors up (process, imports) after the phase
    began, the model in hand after an actor started, scoring and formatting of the blocks.

    Args:
        chunks: :class:`BatchScorer` rows; began: the phase's start (``time.time()``).
    """
    work = chunks["end"] - chunks["start"]
    return {k: round(float(v), 3) for k, v in {
        "first_actor_up": chunks["born"].min() - began, "last_actor_up": chunks["born"].max() - began,
        "model_get_max": (chunks["ready"] - chunks["born"]).max(), "predict_and_format_sum": work.sum(),
        "predict_and_format_max": work.max(), "last_block_done": chunks["end"].max() - began}.items()}


def _locate_and_read(model_uri: str, tracking_uri: str | None, input_path: str | Path) -> tuple[Path, dict[str, str], pa.Table]:
    """The model's local copy (checked to be an mtlrank pyfunc), its request columns and the
    type-checked requests."""
    model_path = local_model(model_uri, tracking_uri)
    cols = request_columns(model_path)
    bundle_dir(model_path)
    return model_path, cols, read_requests(input_path, cols)


def _start_ray(num_cpus: int | None, address: str | None, located: Any) -> None:
    """Start (or join) Ray; if that fails while ``located`` failed too, the input's error wins
    (it is the user's to fix, and Ray's failure may follow from it)."""
    from pipeline.ray_runtime import ensure_ray

    try:
        ensure_ray(num_cpus=num_cpus, address=address)
    except BaseException:
        found = located.exception()  # waits for the thread
        if found is not None:
            raise found from None
        raise


def ray_cpus() -> float:
    """CPUs of the Ray this process is connected to that are free now."""
    import ray

    return float(ray.available_resources().get("CPU", 1))


def _check_threads(threads_per_actor: int) -> None:
    """An actor holds ``threads_per_actor`` CPUs of one node: refuse a number no node has (its
    actors would wait forever)."""
    import ray

    most = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if threads_per_actor > most:
        raise ConfigError(f"--threads-per-actor {threads_per_actor}: no Ray node has that many CPUs (at most {most:g})")


def _load_on_this_node(model_path: Path) -> Any:
    """An object-store reference to the loaded scorer, loaded by a task on the driver's node (the
    model's local copy is there) that holds no CPU, so the scoring actors start meanwhile."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(load_scorer).options(num_cpus=0, scheduling_strategy=here).remote(str(model_path))


def _score(table: pa.Table, scorer_ref: Any, keep: list[str], actors: int, batch_size: int,
           threads_per_actor: int = 1) -> pd.DataFrame:
    """Score ``table`` in contiguous blocks on ``actors`` actors; one row per block, in order.

    Raises:
        RuntimeError: blocks came back out of order or incomplete.
    """
    import ray

    n = table.num_rows
    # a few blocks per actor, each taken by one idle actor at a time: an actor that starts late
    # (its process and imports) gets fewer blocks instead of leaving the first one two in a row
    step = max(1, min(batch_size, -(-n // (actors * BLOCKS_PER_ACTOR))))
    blocks = [table.slice(s, step) for s in range(0, n, step)]
    pool = ray.data.ActorPoolStrategy(size=min(actors, len(blocks)), max_tasks_in_flight_per_actor=1)
    ds = ray.data.from_arrow(blocks).map_batches(
        BatchScorer, fn_constructor_kwargs={"keep": keep, "scorer": scorer_ref, "torch_threads": threads_per_actor},
        batch_size=None, batch_format="pyarrow", compute=pool, num_cpus=threads_per_actor,
    )
    chunks = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    first = table[ROW][0].as_py() if n else 1
    starts = np.cumsum(np.r_[first, chunks["rows"].to_numpy()[:-1]]) if len(chunks) else np.zeros(0)
    if int(chunks["rows"].sum()) != n or not np.array_equal(chunks[ROW].to_numpy(), starts):
        raise RuntimeError(f"scored blocks out of order or incomplete: {int(chunks['rows'].sum())} of {n} rows")
    return chunks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.preprocess import positive_int
    from pipeline.serve.registry import tracking_uri_arg

    parser.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    parser.add_argument("--input", required=True, help="request rows (CSV/Parquet with userid, feedid, device)")
    parser.add_argument("--out", required=True, help="submission CSV written")
    tracking_uri_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=250_000,
                        help="at most this many rows per scoring call (default: the input cut into 4 blocks per actor)")
    parser.add_argument("--concurrency", type=positive_int, default=None,
                        help="scoring actors (default: Ray's free CPUs / --threads-per-actor)")
    parser.add_argument("--threads-per-actor", type=positive_int, default=1,
                        help="CPUs (torch threads) per scoring actor (default 1)")
    parser.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    report = predict_file(args.model, args.input, args.out, args.tracking_uri, args.num_cpus, args.address,
                          args.batch_size, args.concurrency, args.threads_per_actor)
    print(json.dumps(report, indent=2))
    return 0

