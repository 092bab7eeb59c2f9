"""Data-parallel training on Ray Train: the driver side (:func:`run_train`: checks, MLflow run,
``TorchTrainer``) and the per-worker loop (:func:`train_worker`), which runs the same
:func:`~pipeline.train.step.build`, :func:`~pipeline.train.step.train_step` and
:func:`~pipeline.train.loop.fit` as the local run.

Each worker reads its shard of the preprocessed Parquet through Ray Data
(``ray.train.get_dataset_shard``): before the workers start, :func:`rank_shards` reads each split's
Parquet files (one Ray task per file) and keeps for rank ``r`` the rows whose source row number
``_row`` is ``r`` modulo the world size, materialised in Ray's object store (spilling to disk if
needed) as one Ray Data dataset per rank;
:class:`RankShards` hands each rank its part. The same rows on every run and after every restart (so a resumed run equals an
uninterrupted one), every day on every rank, nothing dropped. The worker holds its shard as
tensors and reshuffles it every epoch with a seeded permutation
(:class:`~pipeline.data.MaterializedShard`), so a step pays no ingestion cost.

Evaluation: each rank scores its shard of the validation split; predictions are gathered so
per-user AUC sees all of a user's rows; rank 0 computes the scores (and the oracle's on the same
rows for generated data) and broadcasts them, so every rank takes the same early-stopping
decision. Checkpoints (model with embeddings, optimizers, strategy state with its RNG, position
in the data) at every evaluation and every ``checkpoint.every_steps``; a lost worker restarts the
group from the last one (``FailureConfig``). MLflow is written by rank 0 only.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from mtl.checkpoint import STATE_FILE, save_checkpoint
from mtl.distributed import Collectives
from mtl.features import FeatureSpec
from mtl.strategies import NonFiniteLossError
from pipeline.config import dump_config
from pipeline.data import Batch, MaterializedShard, arrow_to_batch, load_spec, read_split, split_files, take_rows
from pipeline.train import plots
from pipeline.train.config import TrainJobConfig, steps_warning
from pipeline.train.evaluate import mean_routing, oracle_metrics, predict_batches, score_predictions
from pipeline.train.holdout import batch_part
from pipeline.train.loop import FitResult, LoopHooks, fit
from pipeline.train.step import TrainState, build, load_state, save_state

try:  # Ray is imported lazily by the CLI; this module is only imported where Ray is wanted
    from ray.train import DataConfig
except ImportError:  # pragma: no cover
    DataConfig = object  # type: ignore[misc,assignment]


# ---------------------------------------------------------------------- data

#: CPUs per Ray Data task feeding the workers: a fraction, so the reads run beside workers that
#: hold most of a node's CPUs (a whole CPU per read task was seen to hang: stack_notes.md)
INGEST_CPUS = 0.25


class RankShards(DataConfig):  # type: ignore[misc]
    """Hands rank ``r`` its part of each dataset, materialised beforehand by :func:`rank_shards`:
    ``get_dataset_shard("train")`` on rank ``r`` iterates ``parts["train"][r]``, with no Ray Data
    task left to schedule beside the workers (reads inside the workers, competing with them for
    a small cluster's CPUs, were seen to starve and hang).

    Args:
        parts: split name -> one materialised dataset per rank.
    """

    def __init__(self, parts: dict[str, list[Any]]) -> None:
        super().__init__()
        self.parts = parts

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name in datasets:
            parts = self.parts.get(name)
            if parts is None or len(parts) != world_size:
                raise ValueError(f"RankShards: no {world_size} parts for dataset {name!r}")
            for r in range(world_size):
                out[r][name] = parts[r].iterator()
        return out


def rank_shards(files: list[Path], world_size: int) -> list[Any]:
    """Rank ``r``'s rows (``_row % world_size == r``) of a split's Parquet ``files``, materialised
    in Ray's object store (spilling to disk if needed; the driver holds only references) by one
    plain Ray task per file, as one Ray Data dataset per rank. Deterministic (the same rows on
    every run and restart), every day on every rank, nothing dropped.

    Plain tasks rather than a Ray Data execution per rank and split: on a small cluster those
    four executions took 8-15 s of start-up before every training run (tiny data, 2 cores);
    the tasks take well under a second.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # outside any placement group: inside a Tune trial the trial's group would capture the tasks
    # (and it holds no CPU for them)
    free = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(_rank_parts).options(num_returns=world_size, num_cpus=INGEST_CPUS, scheduling_strategy=free)
    outs = [task.remote(str(f), world_size) for f in files]
    per_file = [o if world_size > 1 else [o] for o in outs]
    return [ray.data.from_arrow_refs([parts[r] for parts in per_file]) for r in range(world_size)]


def _rank_parts(path: str, world: int) -> pa.Table | tuple[pa.Table, ...]:
    """One Parquet file's rows cut by rank (a single table when ``world`` is 1)."""
    table = pq.read_table(path)
    if "_row" not in table.column_names:
        raise ValueError(f"{path}: preprocessed splits need the '_row' column (source row numbers) to be sharded")
    rows = table.column("_row").to_numpy()
    parts = tuple(table.filter(pa.array(rows % world == r)) for r in range(world))
    return parts if world > 1 else parts[0]


def materialize_shard(iterator: Any, spec: FeatureSpec) -> Batch | None:
    """A worker's whole shard as one :class:`Batch`, in source-row order (None if empty).

    Each Arrow block is converted to tensors as it arrives and dropped, and the columns are
    joined one at a time, so the peak is about the tensors plus one block and one column
    (not the Arrow shard and its tensors side by side)."""
    parts: list[Batch] = []
    for block in iterator.iter_batches(batch_format="pyarrow", batch_size=None):
        if block.num_rows:
            parts.append(arrow_to_batch(block, spec))
    if not parts:
        return None
    whole = _concat_freeing(parts)
    rows = whole.meta["_row"].numpy()
    if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):  # blocks arrived out of order
        whole = take_rows(whole, torch.from_numpy(np.argsort(rows, kind="stable")))
    return whole


def _concat_freeing(parts: list[Batch]) -> Batch:
    """``parts`` joined column by column, each part's column released once copied."""
    features: dict[str, torch.Tensor] = {}
    meta: dict[str, torch.Tensor] = {}
    for key in list(parts[0].features):
        features[key] = torch.cat([p.features.pop(key) for p in parts])
    for key in list(parts[0].meta):
        meta[key] = torch.cat([p.meta.pop(key) for p in parts])
    labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])  # type: ignore[misc]
    mask = None if parts[0].mask is None else torch.cat([p.mask for p in parts])  # type: ignore[misc]
    return Batch(features, labels, mask, meta)


def split_rows(batch: Batch | None, size: int) -> list[Batch]:
    if batch is None:
        return []
    n = len(batch)
    return [take_rows(batch, torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


# ---------------------------------------------------------------------- the worker


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop of a ``TorchTrainer`` (see the module docstring)."""
    import ray.train
    import ray.train.torch

    job = TrainJobConfig.model_validate(config["job"])
    cfg = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    spec = FeatureSpec.from_dict(config["spec"])
    state = build(cfg, spec, device, check_finite="deferred")
    state.sync.broadcast_parameters()
    side = Collectives()  # evaluation, checks and logging: kept out of the sync's traffic count

    train = materialize_shard(ray.train.get_dataset_shard("train"), spec)
    n_rows = 0 if train is None else len(train)
    sizes = [int(s) for s in torch.cat(side.all_gather(torch.tensor([n_rows], device=device))).tolist()]
    if min(sizes) == 0:
        raise ValueError(f"rank {sizes.index(0)} got no training rows ({sizes} rows per rank): too many workers for the data")
    assert train is not None
    shard = MaterializedShard(train, cfg.batch_size, seed=cfg.seed, rank=rank,
                              num_batches=math.ceil(max(sizes) / cfg.batch_size))
    valid_shard = materialize_shard(ray.train.get_dataset_shard("valid"), spec)
    if valid_shard is not None and cfg.valid_holdout is not None:  # select on the selection rows only
        valid_shard = batch_part(valid_shard, cfg.valid_holdout, "select")
    valid = split_rows(valid_shard, cfg.eval_batch_size)
    record = _Record()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            position = load_state(Path(d) / STATE_FILE, state)
        record.restore(state, position)
    logger = _rank0_logger(config) if rank == 0 else None
    hooks = _Hooks(job, config, state, side, valid, record, logger, rank)
    result = fit(state, _with_faults(job, config, state, shard, rank), hooks.loop_hooks())
    hooks.finish(result)


@dataclass
class _Record:
    """What rank 0 keeps for the plots, carried by checkpoints."""

    history: list[dict[str, Any]] | None = None
    evaluations: list[dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []
        self.evaluations = self.evaluations or []

    def position(self, state: TrainState) -> dict[str, Any]:
        return {"step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "extra": state.extra, "history": self.history, "evaluations": self.evaluations}

    def restore(self, state: TrainState, position: dict[str, Any]) -> None:
        state.step, state.epoch = int(position["step"]), int(position["epoch"])
        state.step_in_epoch = int(position["step_in_epoch"])
        state.extra.update(position["extra"])
        self.history = list(position.get("history", []))
        self.evaluations = list(position.get("evaluations", []))


def _rank0_logger(config: dict[str, Any]) -> Any:
    if not config.get("run_id"):
        return None
    from pipeline.tracking import RunLogger

    return RunLogger(config["tracking_uri"], config["run_id"])


def _with_faults(job: TrainJobConfig, config: dict[str, Any], state: TrainState, shard: MaterializedShard, rank: int) -> Any:
    """``shard.epoch`` with the config's testing aids (a NaN label, a killed process) applied."""
    fault = job.failure

    def epoch_batches(epoch: int, skip: int) -> Any:
        for batch in shard.epoch(epoch, skip):
            step = state.step + 1  # the step this batch is for
            if fault.kill_rank_at_step is not None and tuple(fault.kill_rank_at_step) == (rank, step):
                marker = Path(config["fault_marker"])
                if not marker.exists():  # once per run: the restarted group goes on
                    marker.write_text(f"killed rank {rank} at step {step}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
            if fault.nan_label_at is not None and (fault.nan_label_at.rank, fault.nan_label_at.step) == (rank, step):
                assert batch.labels is not None
                k = state.spec.tasks.index(fault.nan_label_at.task)
                batch.labels[:, k] = float("nan")
            yield batch

    return epoch_batches


class _Hooks:
    """Evaluation, checks, logging and checkpoints of one worker (see :class:`LoopHooks`)."""

    def __init__(self, job: TrainJobConfig, config: dict[str, Any], state: TrainState, side: Collectives,
                 valid: list[Batch], record: _Record, logger: Any, rank: int) -> None:
        self.job, self.config, self.state, self.side = job, config, state, side
        self.valid, self.record, self.logger, self.rank = valid, record, logger, rank
        self.oracle: dict[str, float] | None = None
        # rank 0: the gathered validation predictions of the last evaluation and of the one the
        # run ends with (the best one under early stopping), logged for the multi-task report
        self.last_predictions: tuple[np.ndarray, ...] | None = None
        self.kept_predictions: tuple[np.ndarray, ...] | None = None

    def loop_hooks(self) -> LoopHooks:
        return LoopHooks(
            evaluate=self.evaluate, on_log=self.on_log, on_eval=self.on_eval, on_step=self.on_step,
            check_finite=self.check_finite, mean_over_ranks=self.side.all_reduce_mean,
        )

    # -- evaluation: gather every rank's predictions, score on rank 0, broadcast
    def evaluate(self, state: TrainState) -> dict[str, float]:
        probs, labels, meta = predict_batches(state.eval_model, self.valid, state.device)
        k = state.spec.num_tasks
        if labels is None:
            labels = np.zeros((0, k))
        n = len(probs)
        users = meta.get("_user", np.zeros(n, dtype=np.int64))
        rows = meta.get("_row", np.zeros(n, dtype=np.int64))
        local = np.concatenate([probs.reshape(n, k), labels.reshape(n, k), users.reshape(n, 1), rows.reshape(n, 1)], axis=1)
        parts = self.side.all_gather_varying(torch.from_numpy(local).to(state.device))
        metrics: dict[str, float] = {}
        if self.rank == 0:
            every = torch.cat(parts).cpu().numpy()
            every = every[np.argsort(every[:, 2 * k + 1], kind="stable")]  # source-row order
            p, y = every[:, :k], every[:, k : 2 * k]
            u, r = every[:, 2 * k].astype(np.int64), every[:, 2 * k + 1].astype(np.int64)
            split = self.job.data.valid_split
            metrics = score_predictions(p, y, u, state.spec.tasks, split)
            metrics.update(self._oracle(y, u, r))
            self.last_predictions = (p, y, u, r)
        return _broadcast(metrics)

    def _oracle(self, labels: np.ndarray, users: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        if self.oracle is None:
            raw = self.config.get("raw")
            meta = {"_user": users, "_row": rows}
            self.oracle = oracle_metrics(raw, meta, labels, self.state.spec.tasks) if raw else {}
        return self.oracle

    # -- a NaN on any rank stops every rank with the same message
    def check_finite(self, state: TrainState) -> None:
        rec = state.strategy.nonfinite_record()
        k = state.spec.num_tasks
        if rec is None:
            mine = torch.zeros(2 + k, dtype=torch.float64, device=state.device)
        else:
            flag, step, losses = rec
            mine = torch.cat([flag.double().reshape(1), step.double().reshape(1), losses.double().reshape(-1)])
        bad_ranks = [(float(got[1]), r, got) for r, got in enumerate(self.side.all_gather(mine)) if got[0] > 0]
        if bad_ranks:  # the earliest bad step (its NaN then spreads to every rank through the average)
            _, r, got = min(bad_ranks, key=lambda x: (x[0], x[1]))
            vals = got[2:].tolist()
            bad = [t for t, v in zip(state.spec.tasks, vals) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss for task(s) {bad} at step {int(got[1]) + 1} on rank {r} "
                f"(losses {dict(zip(state.spec.tasks, vals))})",
                tasks=[state.spec.tasks.index(t) for t in bad], step=int(got[1]) + 1, losses=vals,
            )

    # -- logging (rank 0) and checkpoints (every rank reports; rank 0 writes)
    def on_log(self, state: TrainState, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        assert self.record.history is not None
        self.record.history.append(record)
        if self.logger is not None:
            self.logger.metrics(_flat_log(record, state.spec.tasks), step=state.step)

    def on_eval(self, state: TrainState, metrics: dict[str, float], is_best: bool) -> None:
        if self.rank == 0:
            if is_best or not state.cfg.early_stopping.patience:
                self.kept_predictions = self.last_predictions
            assert self.record.evaluations is not None
            self.record.evaluations.append(metrics)
            if self.logger is not None:
                self.logger.metrics({**metrics, "best/score": state.extra["best_score"]}, step=state.step)
        self._report(state, metrics)

    def on_step(self, state: TrainState) -> None:
        every = self.job.checkpoint.every_steps
        if every and state.step % every == 0 and state.extra.get("last_eval_step") != state.step:
            self._report(state, {"step": float(state.step), "epoch": float(state.epoch)})

    def _report(self, state: TrainState, metrics: dict[str, float]) -> None:
        import ray.train

        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.rank != 0:
            ray.train.report(numbers, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(Path(d) / STATE_FILE, state, self.record.position(state))
            ray.train.report(numbers, checkpoint=ray.train.Checkpoint.from_directory(d))

    def finish(self, result: FitResult) -> None:
        """The final report (with the model the run ends with) and rank 0's artifacts."""
        state = self.state
        final = dict(result.best if (state.cfg.early_stopping.patience and result.best) else
                     (result.evaluations[-1] if result.evaluations else {}))
        final.update({"final": 1.0, "train/steps": float(state.step), "stopped_early": float(result.stopped_early)})
        if self.rank == 0 and self.logger is not None:
            self._log_artifacts(result, final)
        self._report(state, final)

    def _log_artifacts(self, result: FitResult, final: dict[str, float]) -> None:
        state, log = self.state, self.logger
        tasks = state.spec.tasks
        assert self.record.history is not None and self.record.evaluations is not None
        log.metrics({f"final/{k}": v for k, v in final.items() if "/" in k}, step=state.step)
        figures = {**plots.loss_curves(self.record.history, tasks), **plots.validation_curves(self.record.evaluations, tasks),
                   **plots.gradient_plots(self.record.history, tasks),
                   **plots.routing_heatmaps(mean_routing(state.model, self.valid), tasks)}
        for path, fig in figures.items():
            log.figure(fig, path)
        plots.close_all(figures)
        routing = mean_routing(state.model, self.valid)
        for name, mean in routing.items():
            log.dict({"tasks": tasks, "mean": mean.tolist()}, f"routing_{name}.json")
        grads = [h["gradients"] for h in self.record.history if "gradients" in h]
        if grads:
            log.dict({"tasks": tasks, "history": [{"step": h["step"], **h["gradients"]} for h in self.record.history if "gradients" in h]},
                     "gradient_diagnostics.json")
        if self.kept_predictions is not None:
            from pipeline.report import log_validation_predictions

            p, y, u, r = self.kept_predictions
            log_validation_predictions(log, log.run_id, p, y, u, tasks, rows=r)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d) / STATE_FILE, state.model)
            state.spec.save(Path(d) / "feature_spec.json")
            (Path(d) / "config.yaml").write_text(dump_config(self.job))
            for name in (STATE_FILE, "feature_spec.json", "config.yaml"):
                log.artifact(Path(d) / name, "model")


def _broadcast(metrics: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _flat_log(record: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    out = {k: v for k, v in record.items() if k.startswith(("train/", "perf/"))}
    g = record.get("gradients")
    if g:
        k = len(tasks)
        for i, t in enumerate(tasks):
            out[f"grad/norm_{t}"] = g["grad_norm"][i]
            for j in range(i + 1, k):
                out[f"grad/cos_{t}__{tasks[j]}"] = g["cosine"][i][j]
        off = [g["conflict"][i][j] for i in range(k) for j in range(k) if i != j]
        out["grad/conflict_rate"] = sum(off) / max(len(off), 1)
    return out


# ---------------------------------------------------------------------- the driver


@dataclass
class TrainOutcome:
    metrics: dict[str, float]
    run_id: str | None
    tracking_uri: str
    checkpoint_path: str | None
    storage_path: str


def resolve_cpus_per_worker(job: TrainJobConfig) -> float:
    """``scaling.cpus_per_worker`` or, for "auto", what the cluster has left after one CPU for
    Ray Data's readers, split over the workers (at least half a CPU each)."""
    value = job.scaling.cpus_per_worker
    if value != "auto":
        return float(value)
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.5, math.floor(2 * (cpus - 1.0) / job.scaling.num_workers) / 2)


def check_job(job: TrainJobConfig, data_dir: str | Path) -> FeatureSpec:
    """Everything checkable before a worker starts: the data folder is a complete preprocess
    output with ``train`` and ``valid`` splits, the model builds on its feature spec, the
    testing aids name real tasks. Returns the feature spec."""
    from mtl.models import build_model

    data_dir = Path(data_dir)
    spec = load_spec(data_dir)
    for split in (job.data.train_split, job.data.valid_split):
        if not split_files(data_dir, split):  # raises if the split is missing
            raise ValueError(f"{data_dir}/{split}: no Parquet files (empty split)")
    build_model(job.train.model.name, job.train.model_spec(spec), **job.train.model.params)  # bad params fail here, not in a worker
    nan = job.failure.nan_label_at
    if nan is not None and nan.task not in spec.tasks:
        raise ValueError(f"failure.nan_label_at.task {nan.task!r} is not a task of {data_dir}: {spec.tasks}")
    # issue 12: too few optimiser steps for the data is a warning (stderr) with the numbers
    warning = steps_warning(job.train, _rows_per_rank(data_dir, job.data.train_split, job.scaling.num_workers))
    if warning:
        print(f"train: {warning}", file=sys.stderr)
    return spec


def _rows_per_rank(data_dir: Path, split: str, world: int) -> list[int]:
    """Training rows of each rank: rank ``r`` keeps the rows with ``_row % world == r``
    (:func:`rank_shards`); an even split where the files have no ``_row``."""
    try:
        row_ids = read_split(data_dir, split, columns=["_row"])["_row"].to_numpy()
    except (KeyError, pa.ArrowInvalid):
        n = sum(pq.read_metadata(p).num_rows for p in split_files(data_dir, split))
        return [n // world + (r < n % world) for r in range(world)]
    return np.bincount(row_ids % world, minlength=world).tolist()


def make_trainer(job: TrainJobConfig, data_dir: str | Path, out: str | Path, spec: FeatureSpec,
                 run_id: str | None = None, tracking_uri: str | None = None, name: str | None = None,
                 callbacks: list[Any] | None = None) -> Any:
    """The ``TorchTrainer`` of a job (Ray must be initialised): workers, storage under ``out``,
    failure handling, the datasets and their per-rank shards. ``run_id``/``tracking_uri``: the
    MLflow run rank 0 logs to (none: no MLflow from the workers). ``callbacks``: Ray Train
    callbacks (e.g. Tune's report callback when the trainer runs inside a Tune trial)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    cpus = resolve_cpus_per_worker(job)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if job.scaling.use_gpu == "auto" else bool(job.scaling.use_gpu)
    name = name or job.name or f"train-{(run_id or 'local')[:12]}"
    # check_job, run by every caller first, has refused empty splits
    parts = {split: rank_shards(split_files(data_dir, getattr(job.data, f"{split}_split")), job.scaling.num_workers)
             for split in ("train", "valid")}
    datasets = {split: shards[0] for split, shards in parts.items()}  # Ray Train wants the names; RankShards hands the parts
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"), "spec": spec.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri,
            "raw": job.raw or _raw_from_report(data_dir), "cpus_per_worker": cpus,
            "fault_marker": str(out / f".fault-injected-{name}"),
        },
        scaling_config=ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=use_gpu,
                                     placement_strategy=job.scaling.placement_strategy,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=job.storage_path or str(out / "ray"),
            failure_config=FailureConfig(max_failures=job.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.num_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=RankShards(parts),
    )


def run_train(job: TrainJobConfig, data_dir: str | Path, out: str | Path, address: str | None = None,
              num_cpus: int | None = None, object_store_memory: int | None = None) -> TrainOutcome:
    """Train on Ray Train (``job.scaling.num_workers`` workers) and log to MLflow: checks
    (:func:`check_job`) before any worker starts, one MLflow run (config, params, per-step and
    per-evaluation metrics, plots, the model), the run's Ray storage under ``out/ray``."""
    import ray

    from pipeline.ray_runtime import ensure_ray
    from pipeline.tracking import RunLogger, resolve_tracking_uri, tracked_run

    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    spec = check_job(job, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the State API lets Ray Train's cleaner confirm the controller's end (else it waits it out)
    ensure_ray(num_cpus=num_cpus, address=address, state_api=True, object_store_memory=object_store_memory)
    uri = resolve_tracking_uri(job.mlflow.tracking_uri, out)
    run_name = job.mlflow.run_name or f"{job.train.model.name}-{job.train.strategy.name}-{job.train.sync}"
    with tracked_run(uri, job.mlflow.experiment, run_name=run_name, artifact_root=out / "mlartifacts") as run_id:
        name = job.name or f"train-{run_id[:12]}"
        trainer = make_trainer(job, data_dir, out, spec, run_id=run_id, tracking_uri=uri, name=name)
        use_gpu = bool(trainer.scaling_config.use_gpu)
        logger = RunLogger(uri, run_id)
        logger.text(dump_config(job), "config.yaml")
        logger.params({**_params(job), "data": str(data_dir), "workers": job.scaling.num_workers,
                       "cpus_per_worker": resolve_cpus_per_worker(job), "use_gpu": use_gpu, "ray_run_name": name,
                       "compute_dtype": _resolved_dtype(job, use_gpu), "nodes": len(ray.nodes())})
        result = _fit(trainer)
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        if ckpt:
            logger.params({"checkpoint": ckpt})
    return TrainOutcome(metrics, run_id, uri, ckpt, job.storage_path or str(out / "ray"))


def _fit(trainer: Any) -> Any:
    """``trainer.fit()``; a worker's non-finite loss comes back as one
    :class:`~mtl.strategies.NonFiniteLossError` naming the task, the step and the rank."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        failures = getattr(exc, "worker_failures", None) or {}
        for err in failures.values() if isinstance(failures, dict) else []:
            if isinstance(err, NonFiniteLossError):
                lines = [ln for ln in str(err).splitlines() if "non-finite loss" in ln]
                message = lines[-1].split("NonFiniteLossError: ", 1)[-1] if lines else str(err)
                raise NonFiniteLossError(message, err.tasks, err.step, err.losses) from exc
        raise


def _raw_from_report(data_dir: Path) -> str | None:
    import json

    report = data_dir / "report.json"
    if not report.is_file():
        return None
    raw = json.loads(report.read_text()).get("raw")
    return raw if raw and (Path(raw) / "oracle").is_dir() else None


def _params(job: TrainJobConfig) -> dict[str, Any]:
    t = job.train
    out = {"model": t.model.name, "strategy": t.strategy.name, "sync": t.sync, "precision": t.precision,
           "batch_size": t.batch_size, "epochs": t.epochs, "lr": t.optimizer.lr, "seed": t.seed}
    out.update({f"model.{k}": v for k, v in t.model.params.items()})
    out.update({f"strategy.{k}": v for k, v in t.strategy.params.items()})
    return out


def _resolved_dtype(job: TrainJobConfig, use_gpu: bool) -> str:
    from mtl.precision import resolve_compute_dtype

    if use_gpu:
        return f"{job.train.precision} (resolved on the GPU workers)"
    return str(resolve_compute_dtype(job.train.precision, torch.device("cpu"), torch.float32))
