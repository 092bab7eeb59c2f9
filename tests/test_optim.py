"""mtl.optim: the row-sparse lazy Adam equals torch.optim.SparseAdam on the rows a batch touched
and leaves every other row alone; dense groups equal torch.optim.Adam; state round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtl.features import DenseFeature, FeatureSpec, SparseFeature
from mtl.models import build_model
from mtl.optim import MixedAdam, build_optimizer


def _spec() -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseFeature("u", 40, 4), SparseFeature("v", 25, 4)],
        dense=[DenseFeature("d")],
        tasks=["a", "b"],
    )


def _batch(gen: torch.Generator, n: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    # ids only from the lower part of each vocabulary, so some rows are never touched
    batch = {
        "u": torch.randint(0, 20, (n,), generator=gen),
        "v": torch.randint(0, 10, (n,), generator=gen),
        "d": torch.randn(n, generator=gen),
    }
    return batch, torch.randint(0, 2, (n, 2), generator=gen).float()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(batch), labels)


def test_only_touched_rows_change() -> None:
    torch.manual_seed(0)
    model = build_model("mmoe", _spec(), num_experts=2, expert_hidden=[8], tower_hidden=[4], sparse_gradients=True)
    opt = build_optimizer(model, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    table = model.inputs.tables["u"].weight
    for _ in range(3):
        batch, labels = _batch(gen)
        before = table.detach().clone()
        state = opt.state[table]
        m_before = state["exp_avg"].clone() if state else torch.zeros_like(table)
        v_before = state["exp_avg_sq"].clone() if state else torch.zeros_like(table)
        opt.zero_grad()
        _loss(model, batch, labels).backward()
        assert table.grad is not None and table.grad.is_sparse
        touched = torch.unique(batch["u"])
        opt.step()
        changed = (table.detach() != before).any(dim=1)
        untouched = torch.ones(table.shape[0], dtype=torch.bool)
        untouched[touched] = False
        assert not changed[untouched].any(), "a row outside the batch was updated"
        assert changed[touched].all(), "a row in the batch was not updated"
        state = opt.state[table]
        assert torch.equal(state["exp_avg"][untouched], m_before[untouched])
        assert torch.equal(state["exp_avg_sq"][untouched], v_before[untouched])
        assert (state["exp_avg"][touched] != m_before[touched]).any(dim=1).all()


def _random_sparse_grad(gen: torch.Generator, rows: int, dim: int, coalesced: bool) -> torch.Tensor:
    n = 12
    idx = torch.randint(0, rows // 2, (n,), generator=gen)  # duplicates likely
    values = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    g = torch.sparse_coo_tensor(idx.unsqueeze(0), values, (rows, dim), check_invariants=True)
    return g.coalesce() if coalesced else g


@pytest.mark.parametrize("coalesced", [True, False])
def test_row_sparse_equals_sparse_adam(coalesced: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    p_ours = nn.Parameter(init.clone())
    p_ref = nn.Parameter(init.clone())
    ours = MixedAdam([{"params": [p_ours], "row_sparse": True}], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ref = torch.optim.SparseAdam([p_ref], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(6):
        g = _random_sparse_grad(gen, 30, 3, coalesced)
        p_ours.grad = g.clone()
        p_ref.grad = g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(p_ours.detach(), p_ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.state[p_ours]["exp_avg"], ref.state[p_ref]["exp_avg"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            ours.state[p_ours]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], rtol=1e-12, atol=1e-12
        )


def test_dense_gradient_on_row_sparse_group_updates_all_rows_like_sparse_adam() -> None:
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    p_ours, p_ref = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    ours = MixedAdam([{"params": [p_ours], "row_sparse": True}], lr=0.1)
    ref = torch.optim.SparseAdam([p_ref], lr=0.1)
    for _ in range(3):
        g = torch.randn(7, 2, generator=gen, dtype=torch.float64)
        p_ours.grad = g.clone()
        p_ref.grad = g.to_sparse()  # every row present
        ours.step()
        ref.step()
    torch.testing.assert_close(p_ours.detach(), p_ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_dense_group_equals_torch_adam(weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen)]
    ours_params = [nn.Parameter(t.clone()) for t in init]
    ref_params = [nn.Parameter(t.clone()) for t in init]
    ours = MixedAdam(ours_params, lr=0.01, weight_decay=weight_decay)
    ref = torch.optim.Adam(ref_params, lr=0.01, weight_decay=weight_decay, foreach=False)
    for _ in range(5):
        for a, b in zip(ours_params, ref_params):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_build_optimizer_step_equals_sparse_adam_plus_adam() -> None:
    """One model, two copies: mtl's default set-up vs SparseAdam (tables) + Adam (the rest)."""
    torch.manual_seed(4)
    model = build_model("mmoe", _spec(), num_experts=2, expert_hidden=[8], tower_hidden=[4], sparse_gradients=True)
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, lr=3e-3)
    emb = {id(p) for p in twin.embedding_parameters()}
    ref_sparse = torch.optim.SparseAdam([p for p in twin.parameters() if id(p) in emb], lr=3e-3)
    ref_dense = torch.optim.Adam([p for p in twin.parameters() if id(p) not in emb], lr=3e-3, foreach=False)
    assert [g["row_sparse"] for g in opt.param_groups] == [True, False]
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        batch, labels = _batch(gen)
        opt.zero_grad()
        _loss(model, batch, labels).backward()
        opt.step()
        ref_sparse.zero_grad()
        ref_dense.zero_grad()
        _loss(twin, batch, labels).backward()
        ref_sparse.step()
        ref_dense.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(6)
    model = build_model("mmoe", _spec(), num_experts=2, expert_hidden=[8], tower_hidden=[4], sparse_gradients=True)
    opt = build_optimizer(model, lr=5e-3)
    gen = torch.Generator().manual_seed(7)
    batches = [_batch(gen) for _ in range(6)]

    def run(m: nn.Module, o: torch.optim.Optimizer, bs: list) -> None:
        for batch, labels in bs:
            o.zero_grad()
            _loss(m, batch, labels).backward()
            o.step()

    run(model, opt, batches[:3])
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    run(model, opt, batches[3:])

    torch.manual_seed(99)  # different init, overwritten by the load
    restored = build_model("mmoe", _spec(), num_experts=2, expert_hidden=[8], tower_hidden=[4], sparse_gradients=True)
    restored.load_state_dict(model_state)
    restored_opt = build_optimizer(restored, lr=5e-3)
    restored_opt.load_state_dict(opt_state)
    run(restored, restored_opt, batches[3:])
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_works_with_lr_scheduler_and_zero_grad() -> None:
    p = nn.Parameter(torch.ones(3, 2))
    opt = MixedAdam([{"params": [p], "row_sparse": True}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (3, 2), check_invariants=True)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert p.grad is None


def test_row_sparse_weight_decay_is_l2_on_touched_rows_only() -> None:
    """Touched rows: SparseAdam's update of ``g_r + wd * p_r``; other rows unchanged."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 3))
    ref = p.detach().clone()
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    wd, lr, (b1, b2), eps = 0.3, 0.1, (0.9, 0.999), 1e-8
    opt = MixedAdam([{"params": [p], "row_sparse": True, "weight_decay": wd}], lr=lr)
    for t, rows in enumerate([[1, 4], [0, 1]], start=1):
        rows_t = torch.tensor(rows)
        g = torch.randn(len(rows), 3)
        p.grad = torch.sparse_coo_tensor(rows_t.unsqueeze(0), g, p.shape, check_invariants=True).coalesce()
        untouched_before = p.detach().clone()
        opt.step()
        g_eff = g + wd * ref[rows_t]
        m[rows_t] = b1 * m[rows_t] + (1 - b1) * g_eff
        v[rows_t] = b2 * v[rows_t] + (1 - b2) * g_eff**2
        step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        ref[rows_t] -= step * m[rows_t] / (v[rows_t].sqrt() + eps)
        torch.testing.assert_close(p.detach(), ref)
        others = torch.ones(6, dtype=torch.bool)
        others[rows_t] = False
        assert torch.equal(p.detach()[others], untouched_before[others])


def test_clear_errors() -> None:
    q = nn.Parameter(torch.ones(3, 2))
    opt = MixedAdam([q])
    q.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (3, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="row_sparse"):
        opt.step()
