"""Data parallelism through the real train step on two gloo ranks (spawned processes, CPU):
`global` equals one process on the union batch, `local` equals the mean of the per-rank
combinations, parameters and strategy state stay identical on every rank, and the traffic of
each sync mode is counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _distributed_worker as W  # noqa: E402

WORLD = 2
ROWS = 48

EQUALITY = ["equal", "pcgrad", "gradvac", "mgda_ub", "cagrad", "nash_mtl"]
STATEFUL = ["gradvac", "dwa", "famo", "gradnorm", "dbmtl", "uncertainty", "nash_mtl"]


def _scenarios() -> list[dict]:
    sc = []
    for s in EQUALITY:  # global == union batch
        model = "shared_bottom" if s == "mgda_ub" else "mmoe"
        sc.append({"id": f"global-{s}", "model": model, "strategy": s, "sync": "global", "steps": 3, "rows": ROWS})
    sc.append({"id": "global-ple-pcgrad", "model": "ple", "strategy": "pcgrad", "sync": "global", "steps": 3, "rows": ROWS})
    for mode in ("local", "gram"):  # local: mean of per-rank combinations; gram: identical params
        sc.append({"id": f"{mode}-pcgrad", "model": "mmoe", "strategy": "pcgrad", "sync": mode, "steps": 3, "rows": ROWS})
    for s in ("mgda", "imtl_g"):
        sc.append({"id": f"local-{s}", "model": "mmoe", "strategy": s, "sync": "local", "steps": 1, "rows": ROWS})
    sc.append({"id": "local-equal", "model": "mmoe", "strategy": "equal", "sync": "local", "steps": 1, "rows": ROWS})
    for s in STATEFUL:
        sc.append({"id": f"state-{s}", "model": "mmoe", "strategy": s, "sync": "local", "steps": 4, "rows": ROWS})
    return sc


SCENARIOS = _scenarios()
BY_ID = {sc["id"]: i for i, sc in enumerate(SCENARIOS)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    d = tmp_path_factory.mktemp("dist")
    mp.spawn(W.worker, args=(WORLD, str(d / "init"), SCENARIOS, str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _result(ranks, sc_id: str, rank: int = 0) -> dict:
    return ranks[rank][BY_ID[sc_id]]


@pytest.mark.parametrize("strategy", EQUALITY + ["ple-pcgrad"])
def test_global_equals_one_process_on_the_union_batch(ranks, strategy, one_torch_thread):
    sc_id = f"global-{strategy}"
    sc = SCENARIOS[BY_ID[sc_id]]
    single = W.run_single(sc, WORLD, "union")
    for r in range(WORLD):
        got = _result(ranks, sc_id, r)
        # gradients of the first step (embeddings included), then all parameters after 3 steps
        torch.testing.assert_close(got["first_grads"], single["first_grads"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["params"], single["params"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["pcgrad", "mgda", "imtl_g"])
def test_local_equals_mean_of_per_rank_combinations(ranks, strategy, one_torch_thread):
    sc_id = f"local-{strategy}"
    sc = SCENARIOS[BY_ID[sc_id]]
    per_rank = [W.run_single({**sc, "steps": 1}, WORLD, f"rank{r}")["first_grads"] for r in range(WORLD)]
    expected = torch.stack(per_rank).mean(0)
    got = _result(ranks, sc_id)["first_grads"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the data is skewed so that the global ordering gives a different update
    union = W.run_single({**sc, "steps": 1}, WORLD, "union")["first_grads"]
    rel = (got - union).norm() / union.norm()
    assert rel > 1e-3


def test_equal_weights_local_is_plain_data_parallelism(ranks, one_torch_thread):
    sc = SCENARIOS[BY_ID["local-equal"]]
    union = W.run_single(sc, WORLD, "union")["first_grads"]
    torch.testing.assert_close(_result(ranks, "local-equal")["first_grads"], union, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sc_id", [sc["id"] for sc in SCENARIOS])
def test_parameters_and_state_identical_on_every_rank(ranks, sc_id):
    a, b = _result(ranks, sc_id, 0), _result(ranks, sc_id, 1)
    assert a["identical"] and b["identical"]
    assert torch.equal(a["params"], b["params"])
    for k, v in a["strategy_state"].items():
        assert torch.equal(v, b["strategy_state"][k]), k


def test_bytes_all_reduced_per_step_by_mode(ranks):
    plain = _result(ranks, "local-equal")["counts"][0]
    local = _result(ranks, "local-pcgrad")["counts"][0]
    glob = _result(ranks, "global-pcgrad")["counts"][0]
    gram = _result(ranks, "gram-pcgrad")["counts"][0]
    p = _result(ranks, "global-pcgrad")["shared_size"]
    k = W.K
    assert local["all_reduce"] == plain["all_reduce"]
    assert glob["all_reduce"] == plain["all_reduce"] + k * p
    assert gram["all_reduce"] == plain["all_reduce"] + k * k
    # embedding rows travel as gathered (ids, rows): the same in every mode for the same batch
    assert local["all_gather"] == plain["all_gather"] == glob["all_gather"] == gram["all_gather"] > 0
