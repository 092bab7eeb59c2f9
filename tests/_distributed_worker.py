"""Runs in spawned gloo ranks for tests/test_distributed.py: scenarios of data-parallel steps
through the real train step (pipeline.train.step), results saved for the test process."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from mtl.distributed import params_equal_across_ranks
from mtl.features import DenseFeature, FeatureSpec, ListFeature, SparseFeature
from pipeline.data import Batch, take_rows
from pipeline.train.config import TrainConfig
from pipeline.train.step import apply_update, backward_and_sync, build

K = 3


def make_spec() -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseFeature("user", 40, 8), SparseFeature("item", 60, 8)],
        lists=[ListFeature("tags", 20, max_len=3, embedding_dim=4)],
        dense=[DenseFeature("x")],
        tasks=[f"t{i}" for i in range(K)],
    )


def make_union_batches(steps: int, rows_per_rank: int, world: int, seed: int = 0, skew: bool = True) -> list[Batch]:
    """``steps`` union batches of ``world * rows_per_rank`` rows; rank r's half is rows
    ``[r * n, (r + 1) * n)``. With ``skew`` the ranks' labels follow different rules, so local
    and global coefficients differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    n = rows_per_rank * world
    for _ in range(steps):
        user = torch.randint(0, 40, (n,), generator=g)
        item = torch.randint(0, 60, (n,), generator=g)
        tags = torch.randint(-1, 20, (n, 3), generator=g)
        x = torch.randn(n, generator=g)
        logits = torch.stack([x + (user % 3 - 1.0), -x + (item % 2) * 1.5, 0.5 * x - (user % 2)], dim=1)
        if skew:  # task 1 agrees with task 0 on rank 0 and opposes it on the others
            later = (torch.arange(n) >= rows_per_rank).unsqueeze(1)
            t1 = torch.where(later[:, 0], -3.0 * logits[:, 0], 3.0 * logits[:, 0])
            logits = torch.stack([3.0 * logits[:, 0], t1, torch.where(later[:, 0], -logits[:, 2], logits[:, 2])], dim=1)
        labels = (torch.rand(n, K, generator=g) < torch.sigmoid(logits)).float()
        out.append(Batch({"user": user, "item": item, "tags": tags, "x": x}, labels))
    return out


def rank_part(batch: Batch, rank: int, rows_per_rank: int) -> Batch:
    return take_rows(batch, torch.arange(rank * rows_per_rank, (rank + 1) * rows_per_rank))


def config(model: str, strategy: str, sync: str = "local", strategy_params: dict | None = None) -> TrainConfig:
    params = {"mmoe": {"num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
              "ple": {"num_levels": 1, "num_shared_experts": 2, "task_experts": 1, "expert_hidden": [16], "tower_hidden": [8]},
              "shared_bottom": {"bottom_hidden": [16], "tower_hidden": [8]}}[model]
    return TrainConfig(
        seed=3, model={"name": model, "params": params},
        strategy={"name": strategy, "params": strategy_params or {}},
        optimizer={"lr": 0.01}, precision="float32", sync=sync, torch_threads=1,
    )


def flat_params(state: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in state.model.parameters()])


def flat_grads(state: Any) -> torch.Tensor:
    out = []
    for p in state.model.parameters():
        g = p.grad
        if g is None:
            out.append(torch.zeros(p.numel()))
        else:
            out.append((g.to_dense() if g.is_sparse else g).reshape(-1))
    return torch.cat(out)


def run_scenario(rank: int, world: int, sc: dict[str, Any]) -> dict[str, Any]:
    cfg = config(sc["model"], sc["strategy"], sc["sync"], sc.get("strategy_params"))
    state = build(cfg, make_spec(), check_finite="deferred")
    batches = make_union_batches(sc["steps"], sc["rows"], world, skew=sc.get("skew", True))
    counts = []
    first_grads = None
    for i, union in enumerate(batches):
        state.sync.comm.reset_counts()
        losses, after = backward_and_sync(state, rank_part(union, rank, sc["rows"]))
        if i == 0:
            first_grads = flat_grads(state)
        apply_update(state, after)
        counts.append(dict(state.sync.comm.counts))
    strategy_state = {k: v.clone() for k, v in state.strategy.state_dict().items() if isinstance(v, torch.Tensor)}
    same = params_equal_across_ranks(list(state.model.parameters()) + [
        v.double() for v in strategy_state.values() if v.is_floating_point()])
    return {"params": flat_params(state), "first_grads": first_grads, "counts": counts, "identical": same,
            "strategy_state": strategy_state, "shared_size": sum(p.numel() for p in state.model.shared_parameters())}


def worker(rank: int, world: int, init_file: str, scenarios: list[dict[str, Any]], out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [run_scenario(rank, world, sc) for sc in scenarios]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_single(sc: dict[str, Any], world: int, which: str = "union") -> dict[str, Any]:
    """One process: ``which="union"`` trains on the union batches; ``"rank<r>"`` on rank r's
    parts only (for the per-rank combinations of ``local`` mode)."""
    cfg = config(sc["model"], sc["strategy"], "local", sc.get("strategy_params"))
    state = build(cfg, make_spec())
    batches = make_union_batches(sc["steps"], sc["rows"], world, skew=sc.get("skew", True))
    first_grads = None
    for i, union in enumerate(batches):
        batch = union if which == "union" else rank_part(union, int(which[4:]), sc["rows"])
        _, after = backward_and_sync(state, batch)
        if i == 0:
            first_grads = flat_grads(state)
        apply_update(state, after)
    return {"params": flat_params(state), "first_grads": first_grads}
