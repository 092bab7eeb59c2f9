"""Architecture contract tests (issue 2): shapes, parameter partition, gradient locality,
the task-gradient scaling contract, gates, and per-architecture equalities."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from mtl.features import DenseFeature, FeatureSpec, ListFeature, NumericEncoding, SparseFeature, VectorFeature
from mtl.models import MODELS, MultiTaskModel, build_model
from mtl.models.mmoe import MMoE
from mtl.models.ple import PLE
from mtl.models.snr import SNR, hard_concrete_open_probability, hard_concrete_sample
from mtl.models.soft_sharing import SoftSharing

B = 6

# variant id -> (registry name, kwargs as a function of the number of tasks K)
VARIANTS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "mmoe": ("mmoe", lambda k: dict(num_experts=3, expert_hidden=[8, 6], tower_hidden=[8])),
    "mmoe_cross": ("mmoe", lambda k: dict(num_experts=3, expert_hidden=[6], tower_hidden=[8], expert_type="cross",
                                          cross={"layers": 2, "rank": 3, "mixtures": 2})),
    "mmoe_gate_remedies": ("mmoe", lambda k: dict(num_experts=3, expert_hidden=[8, 6], tower_hidden=[8],
                                                  gate_temperature=2.5, load_balance=0.3)),
    "single_task": ("single_task", lambda k: dict(hidden=[8, 5])),
    "shared_bottom": ("shared_bottom", lambda k: dict(bottom_hidden=[8, 6], tower_hidden=[8])),
    "shared_bottom_linear_towers": ("shared_bottom", lambda k: dict(bottom_hidden=[7], tower_hidden=[])),
    "shared_bottom_cross": ("shared_bottom", lambda k: dict(bottom_hidden=[7], tower_hidden=[4], bottom_type="cross",
                                                            cross={"layers": 2})),
    "soft_sharing": ("soft_sharing", lambda k: dict(hidden=[8, 5], strength=0.1, penalize_bias=True)),
    "snr_trans": (
        "snr",
        lambda k: dict(variant="trans", num_lower=3, lower_hidden=[8, 6], trans_dim=5, upper_hidden=[8],
                       init_log_alpha=4.0),
    ),
    "snr_aver": (
        "snr",
        lambda k: dict(variant="aver", num_lower=3, lower_hidden=[8, 6], upper_hidden=[8], init_log_alpha=4.0),
    ),
    # CGC with per-task expert counts that differ and include 0.
    "ple_cgc": (
        "ple",
        lambda k: dict(num_levels=1, num_shared_experts=2, task_experts=[(t + 1) % 3 for t in range(k)],
                       expert_hidden=[8, 6], tower_hidden=[8]),
    ),
    "ple_2": (
        "ple",
        lambda k: dict(num_levels=2, num_shared_experts=2, task_experts=[t % 3 for t in range(k)],
                       expert_hidden=[7], tower_hidden=[8]),
    ),
    "ple_2_cross": (
        "ple",
        lambda k: dict(num_levels=2, num_shared_experts=1, task_experts=[t % 2 for t in range(k)],
                       expert_hidden=[7], tower_hidden=[8], expert_type="cross", cross={"layers": 1, "rank": 2}),
    ),
    "ple_3": (
        "ple",
        lambda k: dict(num_levels=3, num_shared_experts=2, task_experts=[(t + 1) % 3 for t in range(k)],
                       expert_hidden=[7], tower_hidden=[8]),
    ),
}


def make_spec(k: int, numeric: bool = False) -> FeatureSpec:
    """The test spec; ``numeric`` adds a dense feature with a piecewise-linear embedding."""
    spec = FeatureSpec(
        sparse=[SparseFeature("u", 11, 4), SparseFeature("i", 13, 3)],
        lists=[ListFeature("tags", 7, max_len=3, embedding_dim=2)],
        dense=[DenseFeature("d", 2)],
        vectors=[VectorFeature("v", 3)],
        tasks=[f"t{t}" for t in range(k)],
    )
    if not numeric:
        return spec
    encoded = DenseFeature("n", 2, boundaries=[[-1.0, 0.0, 0.5, 1.0], [-2.0, -1.0, 1.0, 2.0]],
                           encoding=NumericEncoding("piecewise_linear", dim=2))
    return FeatureSpec(sparse=spec.sparse, lists=spec.lists, dense=[*spec.dense, encoded], vectors=spec.vectors,
                       tasks=spec.tasks)


def make_batch(b: int = B, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, 7, (b, 3), generator=g)
    tags[0, 1:] = -1  # some padding
    return {
        "u": torch.randint(0, 11, (b,), generator=g),
        "i": torch.randint(0, 13, (b,), generator=g),
        "tags": tags,
        "d": torch.randn(b, 2, generator=g),
        "n": torch.randn(b, 2, generator=g),
        "v": torch.randn(b, 3, generator=g),
    }


def build(variant: str, k: int, seed: int = 0) -> MultiTaskModel:
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    return build_model(name, make_spec(k, numeric=True), **kwargs(k))


def task_losses(logits: Tensor, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, logits.shape, generator=g).float()
    return [F.binary_cross_entropy_with_logits(logits[:, t], labels[:, t]) for t in range(logits.shape[1])]


def groups(model: MultiTaskModel) -> tuple[list, list, list[tuple[Any, Tensor]]]:
    return model.embedding_parameters(), model.shared_parameters(), model.task_parameter_owners()


def test_registry_is_covered() -> None:
    assert {name for name, _ in VARIANTS.values()} == set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", make_spec(2))


def _expected_penalty(model: MultiTaskModel) -> float:
    """The penalty from its definition: SNR ``l0 sum_ij P(z_ij != 0)`` with
    ``P = sigmoid(log_alpha - beta log(-gamma / zeta))`` (Louizos et al., eq. 12); soft sharing
    ``strength sum_layers sum_{i<j} ||W_i - W_j||^2`` pair by pair; 0 for the others."""
    if isinstance(model, SNR):
        shift = model.beta * math.log(-model.gamma / model.zeta)
        return model.l0_strength * sum(1 / (1 + math.exp(-(float(a) - shift))) for a in model.log_alpha.detach().flatten())
    if isinstance(model, MMoE) and model.load_balance > 0:
        # the last forward's gates; routing_weights recomputes them from the same batch
        usage = model.routing_weights(make_batch())["gate"].detach().mean(0)  # [K, E]
        return model.load_balance * float((model.num_experts * usage.pow(2).sum(-1) - 1).mean())
    if isinstance(model, SoftSharing):
        tied = [w.detach() for w in list(model.towers.weights) + (list(model.towers.biases) if model.penalize_bias else [])]
        total = sum(float((w[i] - w[j]).pow(2).sum()) for w in tied
                    for i in range(w.shape[0]) for j in range(i + 1, w.shape[0]))
        return model.strength * total
    return 0.0


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes(variant: str, k: int) -> None:
    model = build(variant, k)
    batch = make_batch()
    logits = model(batch)
    assert logits.shape == (B, k)
    assert torch.isfinite(logits).all()
    reg = model.regularization()
    assert reg.shape == ()
    assert float(reg.detach()) == pytest.approx(_expected_penalty(model), rel=1e-5, abs=1e-12)
    model.eval()
    with torch.no_grad():
        assert model(batch).shape == (B, k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_construction(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, make_spec(2))
    assert model(make_batch()).shape == (B, 2)
    assert all(isinstance(v, Tensor) and v.shape[0] == B for v in model.routing_weights(make_batch()).values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_partition_is_complete(variant: str) -> None:
    k = 4
    model = build(variant, k)
    emb, shared, owners = groups(model)
    ids = [id(p) for p in emb] + [id(p) for p in shared] + [id(p) for p, _ in owners]
    assert len(ids) == len(set(ids)), "a parameter is in more than one group"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"
    owned_tasks: set[int] = set()
    for p, owner in owners:
        assert owner.dtype == torch.long and owner.shape == (p.shape[0],)
        assert int(owner.min()) >= 0 and int(owner.max()) < k
        owned_tasks |= set(owner.tolist())
    assert owned_tasks == set(range(k))
    assert [id(p) for p in model.task_specific_parameters()] == [id(p) for p, _ in owners]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_task_loss_reaches_only_shared_and_own_rows(variant: str) -> None:
    k = 3
    model = build(variant, k)
    emb, shared, owners = groups(model)
    losses = task_losses(model(make_batch()))
    params = [*emb, *shared, *(p for p, _ in owners)]
    reached_by = {id(p): torch.zeros(p.shape[0], dtype=torch.long) for p in shared}
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        g = {id(p): gr for p, gr in zip(params, grads)}
        for p in shared:
            if g[id(p)] is not None:
                reached_by[id(p)] += (g[id(p)].reshape(p.shape[0], -1).abs().sum(1) > 0).long()
        own_rows_total = 0.0
        for p, owner in owners:
            gr = g[id(p)]
            if gr is None:
                continue
            other = gr[owner != t]
            assert torch.all(other == 0), f"task {t} loss reaches rows of other tasks in {tuple(p.shape)}"
            own_rows_total += float(gr[owner == t].abs().sum())
        assert own_rows_total > 0, f"task {t} loss reaches none of its own parameters"
        assert any(g[id(p)] is not None and g[id(p)].abs().sum() > 0 for p in emb)
    # "shared" means reached by more than one task's loss (checked per row along dim 0).
    for p in shared:
        assert torch.all(reached_by[id(p)] >= 2), f"shared {tuple(p.shape)}: rows reached by {reached_by[id(p)]}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_task_grad_scale_contract(variant: str) -> None:
    k = 3
    model = build(variant, k)
    emb, shared, owners = groups(model)
    task_params = [p for p, _ in owners]
    batch = make_batch()
    c = torch.tensor([0.3, -1.7, 2.5])

    # Reference: per-task gradients from a plain forward (same RNG state for SNR's sampling).
    torch.manual_seed(123)
    plain = model(batch)
    losses = task_losses(plain)
    all_params = [*emb, *shared, *task_params]
    per_task = [
        [torch.zeros_like(p) if g is None else g for p, g in zip(
            all_params, torch.autograd.grad(loss, all_params, retain_graph=True, allow_unused=True))]
        for loss in losses
    ]

    torch.manual_seed(123)
    model.zero_grad()
    scaled = model(batch, task_grad_scale=c)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    torch.stack(task_losses(scaled)).sum().backward()
    n_common = len(emb) + len(shared)
    for j, p in enumerate(all_params):
        if j < n_common:
            expected = sum(c[t] * per_task[t][j] for t in range(k))
        else:  # own rows get only their own task's plain gradient
            expected = sum(per_task[t][j] for t in range(k))
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mmoe", "mmoe_gate_remedies", "ple_cgc", "ple_2", "ple_3"])
def test_gates_are_distributions(variant: str) -> None:
    model = build(variant, 4)
    routing = model.routing_weights(make_batch())
    assert routing
    for name, gate in routing.items():
        assert gate.shape[0] == B, name
        assert torch.all(gate >= 0), name
        torch.testing.assert_close(gate.sum(-1), torch.ones(gate.shape[:-1]), msg=name)


def test_ple_gates_only_cover_own_and_shared_experts() -> None:
    counts = [1, 2, 0]
    torch.manual_seed(0)
    model = PLE(make_spec(3), num_levels=2, num_shared_experts=2, task_experts=counts, expert_hidden=[6])
    routing = model.routing_weights(make_batch())
    # Expert order: task 0's 1, task 1's 2, (task 2 none), then 2 shared.
    allowed = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    for lvl in range(2):
        gate = routing[f"gate_l{lvl}"]
        assert gate.shape == (B, 3, 5)
        assert torch.all(gate[:, ~allowed] == 0)
        assert torch.all(gate[:, allowed] > 0)
    assert routing["shared_gate_l0"].shape == (B, 5)
    assert "shared_gate_l1" not in routing
    assert torch.equal(routing["gate"], routing["gate_l1"])


def _copy_mmoe_into_cgc(mmoe: MMoE, ple: PLE) -> None:
    level = ple.levels[0]
    assert level.shared_experts is not None and level.gate_weight_task is not None
    with torch.no_grad():
        ple.inputs.load_state_dict(mmoe.inputs.state_dict())
        level.shared_experts.load_state_dict(mmoe.experts.state_dict())
        level.gate_weight_task.copy_(mmoe.gates.weight)
        level.gate_bias_task.copy_(mmoe.gates.bias)
        ple.towers.load_state_dict(mmoe.towers.state_dict())


@pytest.mark.parametrize("k", [2, 4])
def test_cgc_without_task_experts_equals_mmoe(k: int) -> None:
    spec = make_spec(k)
    torch.manual_seed(0)
    mmoe = MMoE(spec, num_experts=3, expert_hidden=[8, 6], tower_hidden=[4])
    torch.manual_seed(1)
    ple = PLE(spec, num_levels=1, num_shared_experts=3, task_experts=0, expert_hidden=[8, 6], tower_hidden=[4])
    batch = make_batch()
    assert not torch.allclose(mmoe(batch), ple(batch))  # differently initialised first
    _copy_mmoe_into_cgc(mmoe, ple)
    torch.testing.assert_close(ple(batch), mmoe(batch), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ple.routing_weights(batch)["gate"], mmoe.routing_weights(batch)["gate"])
    # ... and the same gradients under task-gradient scaling.
    c = torch.linspace(0.5, 2.0, k)
    for m in (mmoe, ple):
        m.zero_grad()
        torch.stack(task_losses(m(batch, task_grad_scale=c))).sum().backward()
    torch.testing.assert_close(ple.levels[0].shared_experts.weights[0].grad, mmoe.experts.weights[0].grad)
    torch.testing.assert_close(ple.levels[0].gate_weight_task.grad, mmoe.gates.weight.grad)
    torch.testing.assert_close(ple.inputs.tables["u"].weight.grad, mmoe.inputs.tables["u"].weight.grad)


def test_ple_rejects_bad_expert_counts() -> None:
    with pytest.raises(ValueError, match="3 tasks"):
        PLE(make_spec(3), task_experts=[1, 1])
    with pytest.raises(ValueError, match="t1"):
        PLE(make_spec(2), num_levels=1, num_shared_experts=0, task_experts=[1, 0])


# ---------------------------------------------------------------- SNR


@pytest.mark.parametrize("variant", ["trans", "aver"])
def test_snr_eval_masks_are_binary_and_deterministic(variant: str) -> None:
    torch.manual_seed(0)
    model = SNR(make_spec(3), variant=variant, num_lower=4, lower_hidden=[6], upper_hidden=[4])
    with torch.no_grad():
        model.log_alpha.copy_(torch.randn(3, 4) * 3)
    batch = make_batch()
    model.train()
    z_train = torch.stack([model.coding_variables() for _ in range(50)])
    assert torch.any((z_train > 0) & (z_train < 1)), "training samples should be relaxed"
    model.eval()
    z = model.coding_variables()
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(z, (model.log_alpha > 0).float())  # the eval rule with gamma=-0.1, zeta=1.1
    assert 0 < z.sum() < z.numel()
    with torch.no_grad():
        out1, out2 = model(batch), model(batch)
    assert torch.equal(out1, out2)
    routing = model.routing_weights(batch)
    assert torch.equal(routing["z"], z.expand(B, -1, -1))
    # A closed connection means the task ignores that lower sub-network entirely.
    task, lower = map(int, (z == 0).nonzero()[0])
    with torch.no_grad():
        model.lower.weights[0][lower].add_(1.0)
        out3 = model(batch)
    assert not z[task, lower]
    open_tasks = z[:, lower].bool()
    assert torch.equal(out3[:, ~open_tasks], out1[:, ~open_tasks])
    if open_tasks.any():
        assert not torch.equal(out3[:, open_tasks], out1[:, open_tasks])


def test_hard_concrete_sampling_matches_l0_formula() -> None:
    beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
    log_alpha = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    torch.manual_seed(0)
    n = 20000
    samples = hard_concrete_sample(log_alpha.expand(n, -1), beta, gamma, zeta)
    assert samples.min() >= 0 and samples.max() <= 1
    freq_open = (samples > 0).float().mean(0)
    p_open = hard_concrete_open_probability(log_alpha, beta, gamma, zeta)
    # Louizos et al. eq. 12 vs the closed form of the stretched binary concrete CDF.
    manual = 1 - torch.sigmoid(beta * math.log(-gamma / zeta) - log_alpha)
    torch.testing.assert_close(p_open, manual)
    assert torch.all((freq_open - p_open).abs() < 0.015), (freq_open, p_open)
    # Exact ones also occur with the right frequency: P(s_bar >= 1).
    freq_one = (samples == 1).float().mean(0)
    p_one = torch.sigmoid(log_alpha - beta * math.log((1 - gamma) / (zeta - 1)))
    assert torch.all((freq_one - p_one).abs() < 0.015), (freq_one, p_one)


def test_snr_regularization_is_l0_penalty() -> None:
    torch.manual_seed(0)
    model = SNR(make_spec(2), num_lower=3, lower_hidden=[6], upper_hidden=[], l0_strength=0.25)
    with torch.no_grad():
        model.log_alpha.copy_(torch.tensor([[-1.0, 0.0, 2.0], [0.5, -3.0, 1.0]]))
    expected = 0.25 * torch.sigmoid(model.log_alpha - (2.0 / 3.0) * math.log(0.1 / 1.1)).sum()
    torch.testing.assert_close(model.regularization(), expected)
    model.regularization().backward()
    assert model.log_alpha.grad is not None and torch.all(model.log_alpha.grad > 0)


def test_snr_training_samples_are_seeded() -> None:
    model = build("snr_trans", 3).train()
    batch = make_batch()
    torch.manual_seed(5)
    a = model(batch)
    torch.manual_seed(5)
    b = model(batch)
    assert torch.equal(a, b)
    with torch.no_grad():
        model.log_alpha.fill_(0.0)  # make the samples vary visibly
    torch.manual_seed(5)
    c = model(batch)
    d = model(batch)
    assert not torch.equal(c, d)


def test_snr_aver_is_sum_of_routed_lower_outputs() -> None:
    torch.manual_seed(0)
    model = SNR(make_spec(2), variant="aver", num_lower=3, lower_hidden=[5], upper_hidden=[]).eval()
    with torch.no_grad():
        model.log_alpha.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]))
    x = model.inputs(make_batch())
    lower = model.lower(x)  # [3, B, 5]
    v0, v1 = lower[0] + lower[2], lower[1]
    w, b = model.upper.weights[0], model.upper.biases[0]  # [2, 5, 1], [2, 1, 1]
    expected = torch.stack([v0 @ w[0] + b[0], v1 @ w[1] + b[1]]).squeeze(-1).t()
    torch.testing.assert_close(model.forward_representation(x), expected)


def test_snr_trans_matches_per_connection_formula() -> None:
    torch.manual_seed(0)
    model = SNR(make_spec(2), variant="trans", num_lower=3, lower_hidden=[5], trans_dim=4, upper_hidden=[])
    model.eval()
    with torch.no_grad():
        model.log_alpha.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]))
    z = model.coding_variables()
    x = model.inputs(make_batch())
    u = model.lower(x)  # [3, B, 5]
    w_up, b_up = model.upper.weights[0], model.upper.biases[0]
    cols = []
    for j in range(2):
        # v_j = sum_i z_ij W_ij u_i with W_ij the i-th [4, 5] block of trans[j].
        v = sum(z[j, i] * u[i] @ model.trans[j, :, i * 5:(i + 1) * 5].t() for i in range(3))
        cols.append(v @ w_up[j] + b_up[j])
    torch.testing.assert_close(model.forward_representation(x), torch.cat(cols, dim=1))


# ---------------------------------------------------------------- soft sharing


def test_soft_sharing_penalty_zero_for_equal_towers_and_pairwise_otherwise() -> None:
    torch.manual_seed(0)
    model = SoftSharing(make_spec(4), hidden=[6, 5], strength=0.5)
    with torch.no_grad():
        for p in model.towers.parameters():
            p.copy_(p[:1].expand_as(p))
    assert model.regularization().item() == 0.0
    torch.manual_seed(1)
    with torch.no_grad():
        model.towers.weights[1][2].add_(torch.randn_like(model.towers.weights[1][2]))
    reg = model.regularization()
    assert reg > 0
    expected = 0.5 * sum(
        (w[i] - w[j]).pow(2).sum() for w in model.towers.weights for i, j in itertools.combinations(range(4), 2)
    )
    torch.testing.assert_close(reg, expected)
    # Biases are tied only on request.
    with torch.no_grad():
        model.towers.biases[0][3].add_(1.0)
    torch.testing.assert_close(model.regularization(), reg)
    model.penalize_bias = True
    assert model.regularization() > reg


def test_soft_sharing_penalty_gradient_pulls_towers_together() -> None:
    torch.manual_seed(0)
    model = SoftSharing(make_spec(3), hidden=[4], strength=1.0)
    w = model.towers.weights[0]
    model.regularization().backward()
    # d/dW_i sum_{a<b} ||W_a - W_b||^2 = 2 * (K W_i - sum_j W_j)
    expected = 2 * (3 * w - w.sum(0, keepdim=True))
    torch.testing.assert_close(w.grad, expected)


# ---------------------------------------------------------------- seeding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_seeded_construction_is_deterministic(variant: str) -> None:
    a = build(variant, 3, seed=7).state_dict()
    b = build(variant, 3, seed=7).state_dict()
    c = build(variant, 3, seed=8).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    # randomly initialised parameters (not buffers such as fitted bin edges, not the cross
    # layers' biases, which start at 0 as in DCN-v2)
    params = {name for name, _ in build(variant, 3, seed=7).named_parameters()}
    float_keys = [key for key in a if key in params and a[key].numel() > 1 and bool((a[key] != a[key].flatten()[0]).any())]
    assert float_keys and all(not torch.equal(a[key], c[key]) for key in float_keys)


@pytest.mark.parametrize("variant", ["mmoe", "shared_bottom", "snr_trans", "ple_2"])
def test_sparse_embedding_gradients_match_dense(variant: str) -> None:
    name, kwargs = VARIANTS[variant]
    spec, batch, c = make_spec(3, numeric=True), make_batch(), torch.tensor([0.5, 1.0, 2.0])
    models = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model(name, spec, sparse_gradients=sparse, **kwargs(3))
        torch.manual_seed(9)
        torch.stack(task_losses(model(batch, task_grad_scale=c))).sum().backward()
        models.append(model)
    dense, sparse_model = models
    for p_dense, p_sparse in zip(dense.inputs.row_sparse_parameters(), sparse_model.inputs.row_sparse_parameters()):
        assert p_sparse.grad is not None and p_sparse.grad.is_sparse
        torch.testing.assert_close(p_sparse.grad.to_dense(), p_dense.grad)
    # the numeric embeddings (the rest of the input's parameters) have dense gradients either way
    numeric = list(zip(dense.inputs.numeric.parameters(), sparse_model.inputs.numeric.parameters()))
    assert numeric
    for p_dense, p_sparse in numeric:
        assert not p_sparse.grad.is_sparse
        torch.testing.assert_close(p_sparse.grad, p_dense.grad)


# ---------------------------------------------------------------- last shared layer (GradNorm's W)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_last_shared_parameters_are_the_shared_layer_closest_to_the_towers(variant: str) -> None:
    """``last_shared_parameters`` is a subset of ``shared_parameters`` that separates the other
    shared parameters from the logits: with its weight matrices zeroed (its outputs then no longer
    depend on anything upstream), no other shared parameter gets a gradient from any task, while
    the layer itself still does. Empty exactly when nothing dense is shared."""
    k = 3
    model = build(variant, k)
    shared, last = model.shared_parameters(), model.last_shared_parameters()
    shared_ids = {id(p) for p in shared}
    assert {id(p) for p in last} <= shared_ids
    assert (len(last) == 0) == (len(shared) == 0)
    if not shared:
        return
    last_ids = {id(p) for p in last}
    before = [g.abs().sum() for g in torch.autograd.grad(sum(task_losses(model(make_batch()))), shared)]
    assert all(float(b) > 0 for b in before)  # every shared parameter is reached normally
    with torch.no_grad():
        for p in last:
            # weights are [members, fan_in, fan_out] (or [rows, fan_in] for gates); biases are
            # [members, 1, fan_out] (or [rows]): zero the ones that multiply an input
            if p.dim() >= 2 and p.shape[-2] > 1:
                p.zero_()
    model.eval()  # SNR: deterministic routing
    grads = torch.autograd.grad(sum(task_losses(model(make_batch()))), shared, allow_unused=True)
    for p, g in zip(shared, grads):
        size = 0.0 if g is None else float(g.abs().sum())
        if id(p) in last_ids:
            continue
        assert size == 0.0, f"{variant}: a shared parameter outside the last shared layer reaches the logits"
    assert any(g is not None and float(g.abs().sum()) > 0 for p, g in zip(shared, grads) if id(p) in last_ids)


@pytest.mark.parametrize("gamma,zeta", [(-0.3, 1.1), (-0.1, 1.6), (-0.05, 1.02)])
def test_snr_eval_rule_at_non_default_stretch(gamma: float, zeta: float) -> None:
    """The eval gate is Louizos et al.'s noise-free estimate ``min(1, max(0, sigmoid(log_alpha)
    (zeta - gamma) + gamma))`` rounded at 0.5: open exactly where
    ``log_alpha > logit((0.5 - gamma) / (zeta - gamma))`` — a threshold away from 0 when the
    stretch is asymmetric."""
    model = SNR(make_spec(2), variant="aver", num_lower=3, lower_hidden=[5], upper_hidden=[], gamma=gamma, zeta=zeta)
    threshold = math.log((0.5 - gamma) / (zeta - 0.5))  # logit((0.5 - gamma) / (zeta - gamma))
    grid = torch.tensor([threshold - 0.3, threshold - 1e-3, threshold + 1e-3, threshold + 0.3, -0.01, 0.01])
    with torch.no_grad():
        model.log_alpha.copy_(grid.view(2, 3))
    model.eval()
    z = model.coding_variables()
    estimate = (torch.sigmoid(grid) * (zeta - gamma) + gamma).clamp(0.0, 1.0)
    assert torch.equal(z.flatten(), (estimate > 0.5).float())
    assert torch.equal(z.flatten()[:4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # asymmetric stretch: log_alpha = +-0.01 straddles 0 but not the threshold (|threshold| > 0.01)
    assert abs(threshold) > 0.01 and bool(z.flatten()[4] == z.flatten()[5])


# ---------------------------------------------------------------- gate remedies (issue 14)


def test_mmoe_gate_temperature_in_the_fused_body_equals_the_modules() -> None:
    """softmax(z / T) gates: the fused kernel (gate layer scaled by 1/T) gives the per-module
    path's logits and gradients; T > 1 flattens the gates."""
    torch.manual_seed(0)
    spec = make_spec(2)
    model = MMoE(spec, num_experts=3, expert_hidden=[8, 6], tower_hidden=[4], gate_temperature=3.0)
    batch = make_batch()
    x = model.inputs(batch)
    z = (x @ model.gates.weight.T + model.gates.bias).view(B, 2, 3)
    torch.testing.assert_close(model.gate_weights(x), torch.softmax(z / 3.0, dim=-1))
    grads = []
    for forward in (model.forward_representation, model.forward_modules):
        model.zero_grad()
        logits = forward(model.inputs(batch))
        torch.stack(task_losses(logits)).sum().backward()
        grads.append((logits.detach(), model.gates.weight.grad.clone(), model.experts.weights[0].grad.clone()))
    for fused, modules in zip(*grads):
        torch.testing.assert_close(fused, modules, rtol=1e-5, atol=1e-6)
    plain = MMoE(spec, num_experts=3, expert_hidden=[8, 6], tower_hidden=[4])
    plain.load_state_dict(model.state_dict())
    entropy = [-(g * g.log()).sum(-1).mean() for g in (model.gate_weights(x), plain.gate_weights(x))]
    assert entropy[0] > entropy[1]


def test_mmoe_load_balance_penalty_reaches_the_gates_only_in_training() -> None:
    torch.manual_seed(0)
    model = MMoE(make_spec(2), num_experts=3, expert_hidden=[6], tower_hidden=[4], load_balance=1.0)
    model(make_batch())
    penalty = model.regularization()
    assert float(penalty) > 0 and penalty.requires_grad
    penalty.backward()
    assert model.gates.weight.grad.abs().sum() > 0 and model.experts.weights[0].grad is None
    assert float(model.regularization()) == 0.0  # consumed: one penalty per forward
    # as the training step runs it: the task losses' backward first (it frees the forward's graph)
    model(make_batch()).sum().backward()
    model.gates.weight.grad = None
    model.regularization().backward()
    assert model.gates.weight.grad.abs().sum() > 0
    model.eval()
    model(make_batch())
    assert float(model.regularization()) == 0.0
