"""bench-distributed: data-parallel steps on Ray Train (2 workers x 1 thread, gloo), the
bench-v1 workload (``shared/docs/bench_v1.md``) on every worker, against a bare DDP reference
in the same run.

Every worker builds every set-up and times their steps interleaved (A B C ... A B C ...), so the
ratios compare set-ups under the same machine load. Set-ups (each its own model and optimizer):

- ``ddp_reference``: bench-v1's bare reference model (``nn.Embedding``, module loop, Adam) in
  ``DistributedDataParallel``: the plain data-parallel step;
- ``equal``: the project's step (:func:`pipeline.train.step.train_step`) with equal weights:
  row-sparse embeddings, the explicit gradient sync of :mod:`mtl.distributed`;
- ``equal_ddp_hooks``: the project's model and optimizer with equal weights, but the gradients
  averaged by DDP's reducer hooks during the backward (gloo's sparse all-reduce for the
  embedding tables; NCCL has none) — the alternative to the explicit sync;
- ``pcgrad_local`` / ``pcgrad_global`` / ``pcgrad_gram``: PCGrad with each sync mode;
- ``equal_raydata``: ``equal`` fed from the worker's Ray Data shard
  (``get_dataset_shard`` -> :class:`~pipeline.data.MaterializedShard`), against ``equal`` fed
  from in-memory tensors built directly in the worker.

Run: ``python bench/bench_distributed.py [--steps 40] [--repeats 2]`` (prints medians, ratios
and the machine's load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_v1 as B  # noqa: E402

SETUPS = ["ddp_reference", "equal", "equal_ddp_hooks", "pcgrad_local", "pcgrad_global", "pcgrad_gram", "equal_raydata"]


def _train_config(strategy: str, sync: str, precision: str) -> Any:
    from pipeline.train.config import TrainConfig

    return TrainConfig(
        seed=0, model={"name": "mmoe", "params": {"num_experts": B.NUM_EXPERTS, "expert_hidden": list(B.EXPERT_HIDDEN),
                                                  "tower_hidden": list(B.TOWER_HIDDEN)}},
        strategy={"name": strategy}, optimizer={"lr": B.LR}, precision=precision, sync=sync,
        batch_size=B.BATCH_SIZE, torch_threads=1,
    )


def _rank_rows(n: int, rank: int, world: int) -> torch.Tensor:
    return torch.arange(rank, n, world)  # the same rows RankShards gives (row % world == rank)


def worker(config: dict[str, Any]) -> None:
    import ray.train
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.data import Batch, MaterializedShard
    from pipeline.train.ray_train import materialize_shard
    from pipeline.train.step import build, train_step

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = B.bench_feature_spec()
    data, labels = B.make_bench_data()
    rows = _rank_rows(labels.shape[0], rank, world)
    mine, my_labels = B.slice_batch(data, labels, rows)
    in_memory = MaterializedShard(Batch(mine, my_labels), B.BATCH_SIZE, seed=1, rank=rank)
    from_ray = materialize_shard(ray.train.get_dataset_shard("train"), spec)
    assert from_ray is not None and len(from_ray) == len(rows)
    ray_shard = MaterializedShard(from_ray, B.BATCH_SIZE, seed=1, rank=rank)

    def cycle(shard: MaterializedShard) -> Any:
        def gen() -> Any:
            epoch = 0
            while True:
                yield from shard.epoch(epoch)
                epoch += 1
        return gen()

    steps: dict[str, Any] = {}
    torch.manual_seed(0)
    ref = DDP(B.ReferenceMMoE())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=B.LR)
    ref_batches = cycle(in_memory)

    def ref_step() -> None:
        b = next(ref_batches)
        B.reference_step(ref, ref_opt, b.features, b.labels)

    steps["ddp_reference"] = ref_step
    precision = config["precision"]
    for name, strategy, sync, source in (
        ("equal", "equal", "local", in_memory), ("pcgrad_local", "pcgrad", "local", in_memory),
        ("pcgrad_global", "pcgrad", "global", in_memory), ("pcgrad_gram", "pcgrad", "gram", in_memory),
        ("equal_raydata", "equal", "local", ray_shard),
    ):
        state = build(_train_config(strategy, sync, precision), spec)
        batches = cycle(source)
        steps[name] = (lambda s=state, it=batches: train_step(s, next(it)))
    hooked = build(_train_config("equal", "local", precision), spec)
    ddp_model = DDP(hooked.model)
    hooked_batches = cycle(in_memory)

    def hooked_step() -> None:
        b = next(hooked_batches)
        opt = hooked.optimizers[0]
        opt.zero_grad(set_to_none=True)
        logits = ddp_model(b.features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels, reduction="sum") / b.labels.shape[0]
        loss.backward()
        opt.step()

    steps["equal_ddp_hooks"] = hooked_step
    steps = {k: steps[k] for k in SETUPS}
    times = B.time_interleaved(steps, warmup=config["warmup"], steps=config["steps"])
    medians = {k: statistics.median(v) for k, v in times.items()}
    ray.train.report({f"median_{k}": v for k, v in medians.items()})
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"medians": medians, "times": times}))


def write_bench_parquet(d: Path) -> Path:
    data, labels = B.make_bench_data()
    cols: dict[str, Any] = {"_row": np.arange(labels.shape[0], dtype=np.int64)}
    cols.update({k: v.numpy() for k, v in data.items()})
    for k, t in enumerate(B.TASKS):
        cols[t] = labels[:, k].numpy()
    path = d / "train"
    path.mkdir(parents=True)
    pq.write_table(pa.table(cols), path / "part-00000.parquet", row_group_size=32768)
    return path


def run_once(steps: int, warmup: int, precision: str, tmp: Path) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.ray_train import RankShards, rank_shards

    out = tmp / f"result-{time.time_ns()}.json"
    shards = rank_shards(sorted((tmp / "train").glob("*.parquet")), 2)
    trainer = TorchTrainer(
        worker, train_loop_config={"steps": steps, "warmup": warmup, "precision": precision, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.75}),
        run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=str(tmp / "ray")),
        datasets={"train": shards[0]}, dataset_config=RankShards({"train": shards}),
    )
    trainer.fit()
    return json.loads(out.read_text())["medians"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--precision", default="auto", help="the project's body precision (default: auto, as training)")
    args = p.parse_args(argv)
    from pipeline.ray_runtime import ensure_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_ray(num_cpus=2)
    print(f"load average before: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_bench_parquet(tmp)
        for r in range(args.repeats):
            med = run_once(args.steps, args.warmup, args.precision, tmp)
            ref = med["ddp_reference"]
            ratios = {
                "equal / ddp_reference": med["equal"] / ref,
                "equal_ddp_hooks / ddp_reference": med["equal_ddp_hooks"] / ref,
                "pcgrad_local / ddp_reference": med["pcgrad_local"] / ref,
                "pcgrad_global / pcgrad_local": med["pcgrad_global"] / med["pcgrad_local"],
                "pcgrad_gram / pcgrad_local": med["pcgrad_gram"] / med["pcgrad_local"],
                "ray data / in-memory steps/s": med["equal"] / med["equal_raydata"],
            }
            rows.append(ratios)
            print(f"repeat {r}: medians (ms, rank 0): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in med.items()))
            for k, v in ratios.items():
                print(f"  {k:<34} {v:.3f}")
    print(f"load average after: {os.getloadavg()}")
    if len(rows) > 1:
        for k in rows[0]:
            print(f"median over repeats: {k:<34} {statistics.median(r[k] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
