"""The training step (pipeline/train/step.py), evaluation (evaluate.py), the loop (loop.py) and
the materialised shard (pipeline/data.py) against independent computations: hand-computed
losses and norms, a brute-force uAUC, the penalties' own gradients, FAMO's Adam step written
out, DWA's formula from the logged per-epoch losses. Tiny synthetic specs; no Ray."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from mtl.features import DenseFeature, FeatureSpec, ListFeature, SparseFeature
from mtl.metrics import WECHAT_ACTION_WEIGHTS
from pipeline.data import Batch, MaterializedShard
from pipeline.train.config import TrainConfig
from pipeline.train.evaluate import oracle_metrics, predict_batches, score_predictions
from pipeline.train.loop import LoopHooks, fit
from pipeline.train.step import backward_and_sync, build, clip_global_norm, masked_bce, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3
MODEL_PARAMS = {
    "mmoe": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [8]},
    "shared_bottom": {"bottom_hidden": [8], "tower_hidden": [4]},
    "snr": {"variant": "trans", "num_lower": 2, "lower_hidden": [8], "upper_hidden": [4]},
    "soft_sharing": {"hidden": [8]},
}


def _spec(k: int = K) -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseFeature("user", 20, 4), SparseFeature("item", 30, 4)],
        lists=[ListFeature("tags", 10, max_len=3, embedding_dim=4)],
        dense=[DenseFeature("x")],
        tasks=[f"t{i}" for i in range(k)],
    )


def _data(n: int, seed: int = 0, k: int = K, mask: bool = False) -> Batch:
    """``n`` rows whose labels follow the features (so training changes the losses)."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, 20, (n,), generator=g)
    item = torch.randint(0, 30, (n,), generator=g)
    x = torch.randn(n, generator=g)
    logits = torch.stack([x + (user % 3 - 1.0), -x + (item % 2) * 1.5, 0.5 * x - (user % 2)][:k], 1)
    labels = (torch.rand(n, k, generator=g) < torch.sigmoid(2 * logits)).float()
    m = (torch.rand(n, k, generator=g) < 0.7).float() if mask else None
    feats = {"user": user, "item": item, "tags": torch.randint(-1, 10, (n, 3), generator=g), "x": x}
    meta = {"_row": torch.arange(1, n + 1), "_user": user.clone()}
    return Batch(feats, labels, m, meta)


def _cfg(model: str = "mmoe", strategy: str = "equal", strategy_params: dict | None = None,
         model_params: dict | None = None, **kw) -> TrainConfig:
    params = dict(MODEL_PARAMS[model], **(model_params or {}))
    kw.setdefault("precision", "float32")
    return TrainConfig(seed=5, model={"name": model, "params": params},
                       strategy={"name": strategy, "params": strategy_params or {}},
                       optimizer=kw.pop("optimizer", {"lr": 0.05}), torch_threads=1, **kw)


def _bce(x: float, y: float) -> float:
    """``-y log sigmoid(x) - (1 - y) log(1 - sigmoid(x))`` written out."""
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# ------------------------------------------------------------------ masked loss


def test_masked_bce_averages_each_task_over_its_own_rows():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, -1.0, 0.5], [-2.0, 0.5, 3.0], [0.3, 0.0, -0.7]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # task 0: rows 0, 1, 3 (3 rows); task 1: rows 0, 2 (2 rows); task 2: row 2 only (1 row)
    expect = [
        (_bce(0.0, 1) + _bce(1.0, 0) + _bce(0.3, 0)) / 3,
        (_bce(2.0, 0) + _bce(0.5, 1)) / 2,
        _bce(3.0, 0),
    ]
    got = masked_bce(logits, labels, mask)
    assert torch.allclose(got, torch.tensor(expect), rtol=1e-6)
    # without a mask every task averages all four rows (a different number for every task)
    plain = [sum(_bce(float(logits[r, t]), float(labels[r, t])) for r in range(4)) / 4 for t in range(3)]
    assert torch.allclose(masked_bce(logits, labels, None), torch.tensor(plain), rtol=1e-6)
    assert all(abs(a - b) > 1e-3 for a, b in zip(expect, plain))
    # a task without any row in the batch contributes 0, not NaN
    mask[:, 2] = 0.0
    assert float(masked_bce(logits, labels, mask)[2]) == 0.0


# ------------------------------------------------------------------ scoring


def _brute_uauc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> float:
    """Mean over users with both classes of the fraction of (pos, neg) pairs ranked right
    (ties count one half): the definition, pair by pair."""
    aucs = []
    for u in np.unique(users):
        yu, pu = y[users == u], p[users == u]
        pos, neg = pu[yu == 1], pu[yu == 0]
        if len(pos) == 0 or len(neg) == 0:
            continue
        pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
        aucs.append(sum(pairs) / len(pairs))
    return float(np.mean(aucs))


def _scoring_case(tasks: list[str], seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 60
    users = rng.integers(0, 5, n)
    labels = (rng.random((n, len(tasks))) < 0.4).astype(np.float32)
    # tasks of different difficulty, so their uAUCs differ; 3 decimals (the scorer rounds to 6)
    signal = np.linspace(2.0, -0.5, len(tasks))
    probs = np.round(1 / (1 + np.exp(-(signal * (labels - 0.5) + rng.normal(size=labels.shape)))), 3)
    return probs, labels, users


def test_score_uses_the_official_wechat_weights():
    tasks = list(WECHAT_ACTION_WEIGHTS)  # read_comment, like, click_avatar, forward, favorite, comment, follow
    probs, labels, users = _scoring_case(tasks)
    m = score_predictions(probs, labels, users, tasks, "valid")
    u = [_brute_uauc(labels[:, k], probs[:, k], users) for k in range(len(tasks))]
    for t, v in zip(tasks, u):
        assert m[f"valid/uauc_{t}"] == pytest.approx(v, abs=1e-12)
    official = (4 * u[0] + 3 * u[1] + 2 * u[2] + u[3] + u[4] + u[5] + u[6]) / 13
    assert m["valid/score"] == pytest.approx(official, abs=1e-6)
    assert abs(official - float(np.mean(u))) > 1e-3  # equal weights would give another number
    # the preliminary round's four actions: 4, 3, 2, 1 over 10
    m4 = score_predictions(probs[:, :4], labels[:, :4], users, tasks[:4], "valid")
    assert m4["valid/score"] == pytest.approx((4 * u[0] + 3 * u[1] + 2 * u[2] + u[3]) / 10, abs=1e-6)


def test_score_uses_equal_weights_for_other_task_names():
    tasks = ["ctr", "cvr", "like"]  # not all WeChat actions: equal weights, also for "like"
    probs, labels, users = _scoring_case(tasks, seed=1)
    m = score_predictions(probs, labels, users, tasks, "test")
    u = [_brute_uauc(labels[:, k], probs[:, k], users) for k in range(3)]
    assert m["test/score"] == pytest.approx(sum(u) / 3, abs=1e-6)
    assert abs(sum(u) / 3 - (u[0] + u[1] + 3 * u[2]) / 5) > 1e-3


def test_score_auc_logloss_and_mask_against_definitions():
    tasks = ["a", "b"]
    probs, labels, users = _scoring_case(tasks, seed=2)
    mask = np.ones_like(labels)
    mask[::3, 1] = 0.0  # task b counts two rows in three
    m = score_predictions(probs, labels, users, tasks, "v", mask=mask)
    keep = mask[:, 1] > 0
    for k, t, rows in ((0, "a", slice(None)), (1, "b", keep)):
        y, p = labels[rows, k], probs[rows, k]
        ll = -np.mean([math.log(q) if lab else math.log(1 - q) for lab, q in zip(y, p)])
        assert m[f"v/logloss_{t}"] == pytest.approx(ll, rel=1e-9)
        assert m[f"v/auc_{t}"] == pytest.approx(_brute_uauc(y, p, np.zeros(len(y))), abs=1e-12)
        assert m[f"v/uauc_{t}"] == pytest.approx(_brute_uauc(y, p, users[rows]), abs=1e-12)
    assert m["v/uauc_b"] != pytest.approx(_brute_uauc(labels[:, 1], probs[:, 1], users), abs=1e-6)
    # without users: AUC and log loss, no uAUC and no score
    no_users = score_predictions(probs, labels, None, tasks, "v")
    assert "v/score" not in no_users and "v/uauc_a" not in no_users and "v/auc_a" in no_users


def test_predict_batches_keeps_order_and_training_mode():
    spec = _spec()
    state = build(_cfg(), spec)
    data = _data(10)
    parts = [Batch({k: v[s] for k, v in data.features.items()}, data.labels[s], None,
                   {k: v[s] for k, v in data.meta.items()}) for s in (slice(0, 4), slice(4, 10))]
    state.model.train()
    probs, labels, meta = predict_batches(state.model, parts)
    assert state.model.training
    state.model.eval()
    with torch.no_grad():
        expect = torch.sigmoid(state.model(data.features)).double().numpy()
    assert np.allclose(probs, expect, atol=1e-7) and probs.dtype == np.float64
    assert np.array_equal(labels, data.labels.numpy())
    assert np.array_equal(meta["_row"], np.arange(1, 11))


def test_oracle_metrics_join_the_true_probabilities_by_source_row(tmp_path):
    import pandas as pd

    tasks = ["read_comment", "like"]
    rng = np.random.default_rng(3)
    n = 40
    oracle = pd.DataFrame({"row": np.arange(n), "userid": rng.integers(0, 4, n)})
    for t in tasks:
        oracle[f"p_{t}"] = np.round(rng.random(n), 4)
    (tmp_path / "oracle").mkdir()
    oracle.to_parquet(tmp_path / "oracle" / "oracle_train.parquet")
    pick = rng.permutation(n)[:30]  # a valid split: some rows, in another order, numbered from 1
    meta = {"_row": pick + 1, "_user": oracle["userid"].to_numpy()[pick]}
    labels = (rng.random((30, 2)) < 0.5).astype(np.float32)
    m = oracle_metrics(tmp_path, meta, labels, tasks)
    u = [_brute_uauc(labels[:, k], oracle[f"p_{t}"].to_numpy()[pick], meta["_user"]) for k, t in enumerate(tasks)]
    assert m["oracle/uauc_read_comment"] == pytest.approx(u[0], abs=1e-12)
    assert m["oracle/score"] == pytest.approx((4 * u[0] + 3 * u[1]) / 7, abs=1e-6)
    with pytest.raises(ValueError, match="line up"):
        oracle_metrics(tmp_path, {"_row": pick + 1, "_user": meta["_user"] + 1}, labels, tasks)
    assert oracle_metrics(tmp_path / "none", meta, labels, tasks) == {}


# ------------------------------------------------------------------ build and the step


def test_build_passes_the_config_to_model_strategy_optimizers_and_sync():
    spec = _spec()
    cfg = _cfg(strategy="pcgrad", optimizer={"lr": 0.02, "embedding_lr": 0.3, "weight_decay": 0.1},
               sync="gram", precision="bfloat16")
    state = build(cfg, spec, check_finite="deferred")
    assert state.model.compute_dtype == "bfloat16"
    assert state.model.inputs.sparse_gradients  # row-sparse embedding gradients
    assert state.strategy.check_finite == "deferred"
    # the run's seed seeds the strategy's task-order generator
    assert torch.equal(state.strategy.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    emb, dense = state.optimizers[0].param_groups
    assert emb["lr"] == 0.3 and emb["weight_decay"] == 0.0 and emb["row_sparse"]
    assert dense["lr"] == 0.02 and dense["weight_decay"] == 0.1
    assert {id(p) for p in emb["params"]} == {id(p) for p in state.model.embedding_parameters()}
    assert len(state.optimizers) == 1  # PCGrad has no parameters of its own
    assert state.sync.mode == "gram" and build(cfg, spec, sync_mode="global").sync.mode == "global"
    famo = build(_cfg(strategy="famo", strategy_params={"lr": 0.5, "gamma": 0.2}), spec).strategy
    assert (famo.lr, famo.gamma) == (0.5, 0.2)


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    from pipeline.train.step import seed_everything

    draws = []
    for seed in (3, 3, 4):
        seed_everything(seed)
        draws.append((random.random(), float(np.random.random()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    assert all(a != b for a, b in zip(draws[0], draws[2]))


def test_train_step_reads_the_mask_and_rejects_unlabelled_batches():
    spec = _spec()
    data = _data(16, mask=True)
    state = build(_cfg(), spec)
    with torch.no_grad():
        expect = masked_bce(state.model(data.features), data.labels, data.mask)
        unmasked = masked_bce(state.model(data.features), data.labels, None)
    assert not torch.allclose(expect, unmasked, rtol=1e-3)
    losses = train_step(state, data)
    assert torch.allclose(losses, expect, rtol=1e-6)
    assert state.step == 1 and state.step_in_epoch == 1
    for p in state.model.embedding_parameters():  # row-sparse gradients, as built
        assert p.grad is None or p.grad.is_sparse
    # integer labels are cast to the logits' dtype
    int_labels = masked_bce(torch.zeros(2, 1), torch.tensor([[1], [0]]), None)
    assert torch.allclose(int_labels, torch.tensor([math.log(2.0)]))
    with pytest.raises(ValueError, match="^train_step: the batch has no labels$"):
        train_step(state, Batch(data.features))


def test_uncertainty_log_variances_take_their_own_adam_step():
    """The strategy's own parameters get an Adam optimizer at the run's lr: after one step
    ``s_i = -lr sign(dL/ds_i)`` with ``dL/ds_i = -exp(-s_i) L_i + 1/2`` at ``s = 0``."""
    spec = _spec()
    state = build(_cfg(strategy="uncertainty", optimizer={"lr": 0.03}), spec)
    assert len(state.optimizers) == 2
    losses = train_step(state, _data(32))
    grad = 0.5 - losses.double()
    expect = -0.03 * grad / (grad.abs() + 1e-8)
    assert torch.allclose(state.strategy.log_vars.detach().double(), expect, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("model", ["shared_bottom", "mmoe"])
def test_mgda_ub_in_the_step_uses_the_shared_representation(model):
    """train_step with MGDA-UB: the shared gradient is ``sum_i w_i g_i`` with ``w`` the min-norm
    point (brute force over the simplex's faces) of the gradients w.r.t. the shared
    representation (Shared-Bottom's bottom, MMoE's experts), not w.r.t. the parameters."""
    spec = _spec()
    data = _data(32)
    state = build(_cfg(model, "mgda_ub"), spec)
    module = state.extra["representation_module"]
    assert module is (state.model.bottom if model == "shared_bottom" else state.model.experts)
    ref = copy.deepcopy(state.model)
    captured = []
    rep_module = ref.bottom if model == "shared_bottom" else ref.experts
    h = rep_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    losses = masked_bce(ref(data.features), data.labels, None)
    h.remove()
    rep = torch.stack([torch.autograd.grad(losses[i], captured[0], retain_graph=True)[0].reshape(-1)
                       for i in range(K)]).double()
    shared = ref.shared_parameters()
    g = torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(losses[i], shared, retain_graph=True)])
                     for i in range(K)]).double()
    w = _min_norm_brute(rep @ rep.t())
    assert not np.allclose(w, _min_norm_brute(g @ g.t()), atol=1e-2)
    backward_and_sync(state, data)
    got = torch.cat([p.grad.reshape(-1) for p in state.model.shared_parameters()]).double()
    expect = torch.from_numpy(w) @ g
    assert float((got - expect).norm() / expect.norm()) < 1e-3


def _min_norm_brute(gram: torch.Tensor) -> np.ndarray:
    """``argmin_{w in simplex} w^T M w``: each face's ``M_S w = mu 1`` solved, the best feasible."""
    m = gram.numpy()
    k = m.shape[0]
    if (np.diag(m) == 0).any():  # a zero gradient is the min-norm point
        return (np.diag(m) == 0).astype(float) / (np.diag(m) == 0).sum()
    best, best_w = math.inf, None
    for r in range(1, k + 1):
        for face in itertools.combinations(range(k), r):
            sub = m[np.ix_(face, face)]
            try:
                u = np.linalg.solve(sub, np.ones(r))
            except np.linalg.LinAlgError:
                continue
            if u.sum() <= 0 or (u < -1e-12).any():
                continue
            w = np.zeros(k)
            w[list(face)] = u / u.sum()
            if w @ m @ w < best:
                best, best_w = w @ m @ w, w
    return best_w


# ------------------------------------------------------------------ clipping


def test_clip_global_norm_dense_and_row_sparse_by_hand():
    dense = torch.nn.Parameter(torch.zeros(2))
    dense.grad = torch.tensor([3.0, 4.0])
    table = torch.nn.Parameter(torch.zeros(4, 2))
    # an uncoalesced row-sparse gradient: row 0 twice (summed: [2, 2]) and row 2
    table.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2, 0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]]), (4, 2),
                                         check_invariants=True)
    untouched = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    params = [dense, table, untouched]
    norm = clip_global_norm(params, 2.0)
    total = math.sqrt(3**2 + 4**2 + 2**2 + 2**2 + 1**2)  # sqrt(34): duplicates summed first
    assert float(norm) == pytest.approx(total, rel=1e-6)
    f = 2.0 / (total + 1e-6)
    assert torch.allclose(dense.grad, torch.tensor([3.0, 4.0]) * f)
    assert table.grad.is_sparse
    assert torch.allclose(table.grad.to_dense(), torch.tensor([[2.0, 2.0], [0, 0], [0.0, 1.0], [0, 0]]) * f)
    assert untouched.grad is None
    new_total = math.sqrt(float(dense.grad.pow(2).sum()) + float(table.grad.to_dense().pow(2).sum()))
    assert new_total == pytest.approx(2.0, rel=1e-5)
    # below the bound nothing changes
    before = dense.grad.clone()
    assert float(clip_global_norm(params, 10.0)) == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(dense.grad, before)
    assert float(clip_global_norm([untouched], 1.0)) == 0.0


def test_train_step_clips_all_gradients_before_the_update():
    """With ``clip_grad_norm`` the gradients the optimizer steps on are the step's gradients
    (embedding tables included) times ``max_norm / ||g||`` (checked in ``.grad`` after the step)."""
    spec = _spec()
    cfg = _cfg(optimizer={"lr": 0.1, "clip_grad_norm": 0.01})
    data = _data(32)
    state = build(cfg, spec)
    losses, _ = backward_and_sync(state, data)
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
             for n, p in state.model.named_parameters() if p.grad is not None}
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert total > 0.01  # the bound binds
    state2 = build(cfg, spec)
    before = {n: p.detach().clone() for n, p in state2.model.named_parameters()}
    train_step(state2, data)
    # the first Adam step moves every coordinate by ~lr * sign(g) whatever the scale, so
    # check the clipped gradient itself: it is left in .grad by the step
    after_grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
                   for n, p in state2.model.named_parameters() if p.grad is not None}
    f = 0.01 / (total + 1e-6)
    for n, g in grads.items():
        assert torch.allclose(after_grads[n], g * f, rtol=1e-4, atol=1e-9), n
    assert any(not torch.equal(before[n], p) for n, p in state2.model.named_parameters())


# ------------------------------------------------------------------ regularisation


@pytest.mark.parametrize("model,strategy,knob", [
    ("snr", "equal", "l0_strength"),
    ("snr", "pcgrad", "l0_strength"),
    ("snr", "uncertainty", "l0_strength"),
    ("soft_sharing", "equal", "strength"),
    ("soft_sharing", "dwa", "strength"),
])
def test_model_penalty_reaches_exactly_its_parameters(model, strategy, knob):
    """The step's gradient with the penalty minus the gradient without it is the penalty's own
    gradient, written out from its formula, on the penalised parameters, and zero elsewhere."""
    spec = _spec()
    data = _data(24)
    grads = {}
    for strength in (0.0, 0.3):
        state = build(_cfg(model, strategy, model_params={knob: strength}), spec)
        backward_and_sync(state, data)
        grads[strength] = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
                           for n, p in state.model.named_parameters() if p.grad is not None}
        m = state.model
    diff = {n: grads[0.3][n] - grads[0.0][n] for n in grads[0.0]}
    if model == "snr":
        # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)) (Louizos et al., eq. 12):
        # d/d log_alpha of 0.3 * sum P = 0.3 P (1 - P)
        p = torch.sigmoid(m.log_alpha.detach() - (2.0 / 3.0) * math.log(0.1 / 1.1))
        expect = {"log_alpha": 0.3 * p * (1 - p)}
    else:
        # 0.3 sum_{i<j} ||W_i - W_j||^2: d/dW_i = 0.6 sum_j (W_i - W_j) = 0.6 (K W_i - sum_j W_j)
        expect = {}
        for n, w in m.named_parameters():
            if any(w is t for t in m.tied_parameters()):
                w = w.detach()
                expect[n] = 0.6 * (K * w - w.sum(0, keepdim=True))
        assert expect
    for n, d in diff.items():
        want = expect.get(n, torch.zeros_like(d))
        assert torch.allclose(d, want, rtol=1e-4, atol=1e-6), (n, float((d - want).abs().max()))


# ------------------------------------------------------------------ FAMO after the step


def test_famo_updates_from_the_losses_re_evaluated_after_the_step():
    """train_step feeds FAMO the same batch's losses after the optimizer step: the task logits
    take one Adam step on ``z * (delta - z . delta) + gamma xi`` with
    ``delta = log L_before - log L_after`` (official FAMO), written out here."""
    spec = _spec()
    data = _data(48)
    state = build(_cfg(strategy="famo", strategy_params={"lr": 0.025, "gamma": 0.01}), spec)
    before = train_step(state, data).double()
    with torch.no_grad():
        after = masked_bce(state.model(data.features), data.labels, None).double()
    assert bool((after < before).all())  # the step lowered every loss: delta > 0
    z = torch.full((K,), 1.0 / K, dtype=torch.float64)  # softmax of the initial logits 0
    delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
    g = z * (delta - (z * delta).sum())  # + gamma * 0
    # Adam's first step: m_hat = g, v_hat = g^2 -> xi = -lr g / (|g| + eps)
    expect = -0.025 * g / (g.abs() + 1e-8)
    assert torch.allclose(state.strategy.logits.double(), expect, rtol=1e-5, atol=1e-9)
    assert not bool(state.strategy.pending)
    # a second step: Adam's moments carry over, the weight decay now acts on xi
    losses2 = train_step(state, data).double()
    with torch.no_grad():
        after2 = masked_bce(state.model(data.features), data.labels, None).double()
    z2 = torch.softmax(expect, 0)
    delta2 = torch.log(losses2 + 1e-8) - torch.log(after2 + 1e-8)
    g2 = z2 * (delta2 - (z2 * delta2).sum()) + 0.01 * expect
    m = 0.9 * (0.1 * g) + 0.1 * g2
    v = 0.999 * (0.001 * g * g) + 0.001 * g2 * g2
    xi2 = expect - 0.025 * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    assert torch.allclose(state.strategy.logits.double(), xi2, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ materialised shard


def test_materialized_shard_seeded_permutation_per_epoch():
    data = _data(10)
    a = MaterializedShard(data, 4, seed=7)
    rows = lambda shard, e: torch.cat([b.meta["_row"] for b in shard.epoch(e)]).tolist()  # noqa: E731
    e0, e1 = rows(a, 0), rows(a, 1)
    assert sorted(e0) == sorted(e1) == list(range(1, 11))  # each row once per epoch
    assert e0 != e1 and e0 != list(range(1, 11))
    assert [len(b) for b in a.epoch(0)] == [4, 4, 2]
    assert rows(MaterializedShard(data, 4, seed=7), 1) == e1  # same seed, same order
    assert rows(MaterializedShard(data, 4, seed=8), 1) != e1
    assert rows(MaterializedShard(data, 4, seed=7, rank=1), 1) != e1
    # the batches carry matching features, labels and meta
    for b in a.epoch(0):
        idx = b.meta["_row"] - 1
        assert torch.equal(b.features["x"], data.features["x"][idx])
        assert torch.equal(b.labels, data.labels[idx])


def test_materialized_shard_skip_resumes_with_the_same_batches():
    shard = MaterializedShard(_data(23), 5, seed=1)
    full = [b.meta["_row"].tolist() for b in shard.epoch(2)]
    for skip in range(len(full) + 1):
        assert [b.meta["_row"].tolist() for b in shard.epoch(2, skip)] == full[skip:]


def test_materialized_shard_agreed_num_batches_wraps_around():
    """Ranks with 13 and 10 rows agree on 4 batches of 4: the short shard repeats the start of
    its own permutation (wrap-around) and counts the repeated rows."""
    long = MaterializedShard(_data(13), 4, seed=3, rank=0)
    short = MaterializedShard(_data(10), 4, seed=3, rank=1, num_batches=long.num_batches)
    assert long.num_batches == 4 and long.repeated_rows == 0
    batches = list(short.epoch(0))
    assert len(batches) == 4
    got = torch.cat([b.meta["_row"] for b in batches]).tolist()
    perm = got[:10]
    assert sorted(perm) == list(range(1, 11))
    assert got == perm + perm[:3]  # 13 rows in all, the last 3 repeat the first 3
    assert [len(b) for b in batches] == [4, 4, 4, 1] == [len(b) for b in long.epoch(0)]
    assert short.repeated_rows == 3
    with pytest.raises(ValueError, match="no rows"):
        MaterializedShard(Batch({}), 4, seed=0)


# ------------------------------------------------------------------ the loop


def _loop_state(epochs: int = 3, **kw):
    spec = _spec()
    cfg = _cfg(epochs=epochs, batch_size=8, **kw)
    state = build(cfg, spec)
    shard = MaterializedShard(_data(20, seed=4), cfg.batch_size, seed=cfg.seed)  # 3 batches/epoch
    return state, shard


def test_end_epoch_called_exactly_once_per_epoch():
    state, shard = _loop_state(epochs=3, eval_every_steps=2)
    calls = []
    original = state.strategy.end_epoch
    state.strategy.end_epoch = lambda: (calls.append(state.step), original())[1]
    res = fit(state, shard.epoch, LoopHooks(evaluate=lambda s: {"valid/score": 0.5}))
    assert calls == [3, 6, 9]  # after the last step of each epoch, once
    assert state.epoch == 3 and state.step == 9
    # evaluations every 2 steps and at each epoch end, never twice at one step
    assert [e["step"] for e in res.evaluations] == [2.0, 3.0, 4.0, 6.0, 8.0, 9.0]


def test_no_end_epoch_for_an_epoch_cut_by_max_steps():
    state, shard = _loop_state(epochs=3, max_steps=5)
    calls = []
    state.strategy.end_epoch = lambda: calls.append(state.step)
    res = fit(state, shard.epoch, LoopHooks(evaluate=lambda s: {"valid/score": 0.5}))
    assert calls == [3] and state.step == 5
    assert [e["step"] for e in res.evaluations] == [3.0, 5.0]


def test_dwa_weights_follow_the_per_epoch_mean_losses():
    """DWA (periods = epochs) through fit: after epochs 1 and 2 its weights are
    ``K softmax((L(2) / L(1)) / T)`` of the per-epoch mean losses the loop logged step by step."""
    state, shard = _loop_state(epochs=3, strategy="dwa", strategy_params={"temperature": 2.0}, log_every=1)
    weights_seen = []
    hooks = LoopHooks(evaluate=lambda s: {"valid/score": 0.5},
                      on_step=lambda s: weights_seen.append(s.strategy.weights().clone()))
    res = fit(state, shard.epoch, hooks)
    per_step = np.array([[r[f"train/loss_t{i}"] for i in range(K)] for r in res.history])
    assert per_step.shape == (9, K)
    epoch_mean = [per_step[3 * e: 3 * e + 3].mean(0) for e in range(3)]
    # unchanged within an epoch (ones until two epochs are done)
    for s in range(6):
        assert torch.equal(weights_seen[s], torch.ones(K))
    r = epoch_mean[1] / epoch_mean[0]
    w = K * np.exp(r / 2.0) / np.exp(r / 2.0).sum()
    assert np.allclose(weights_seen[6].numpy(), w, rtol=1e-5)
    assert torch.equal(weights_seen[6], weights_seen[8])
    r3 = epoch_mean[2] / epoch_mean[1]  # after the third epoch end
    assert np.allclose(state.strategy.weights().numpy(), K * np.exp(r3 / 2) / np.exp(r3 / 2).sum(), rtol=1e-5)


def test_early_stopping_restores_the_best_weights():
    """Scripted scores 0.5, 0.7, 0.6, 0.65 with patience 2: stop after the 4th evaluation and
    put back the weights of the 2nd (the best), not the last."""
    state, shard = _loop_state(epochs=5, eval_every_steps=1, early_stopping={"patience": 2})
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.99, 0.99])
    snapshots = []

    def evaluate(s):
        snapshots.append({k: v.clone() for k, v in s.model.state_dict().items()})
        return {"valid/score": next(scores)}

    res = fit(state, shard.epoch, LoopHooks(evaluate=evaluate))
    assert res.stopped_early and len(res.evaluations) == 4 and state.step == 4
    assert res.best["valid/score"] == 0.7 and res.best["step"] == 2.0
    final = state.model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert any(not torch.equal(snapshots[3][k], snapshots[1][k]) for k in final)  # a real restore


def test_early_stopping_min_delta_and_no_restore_without_patience():
    state, shard = _loop_state(epochs=1, eval_every_steps=1, early_stopping={"patience": 2, "min_delta": 0.05})
    scores = iter([0.5, 0.54, 0.53, 0.9])
    res = fit(state, shard.epoch, LoopHooks(evaluate=lambda s: {"valid/score": next(scores)}))
    assert res.stopped_early and len(res.evaluations) == 3  # 0.54 is within min_delta of 0.5
    assert res.best["step"] == 1.0
    state, shard = _loop_state(epochs=1, eval_every_steps=1)
    scores = iter([0.9, 0.1, 0.1])
    res = fit(state, shard.epoch, LoopHooks(evaluate=lambda s: {"valid/score": next(scores)}))
    assert not res.stopped_early and len(res.evaluations) == 3
    snapshot = {k: v.clone() for k, v in state.model.state_dict().items()}
    assert state.extra["best_metrics"]["step"] == 1.0
    assert any(not torch.equal(snapshot[k], state.extra["best_model"][k]) for k in snapshot)  # last kept


def test_fit_resumes_mid_epoch_with_the_remaining_batches():
    """A run stopped at step 2 and resumed (same state object, max_steps lifted) sees the same
    batches and ends with the same weights as an uninterrupted run."""
    state_a, shard = _loop_state(epochs=2)
    fit(state_a, shard.epoch, LoopHooks(evaluate=lambda s: {}))
    state_b, _ = _loop_state(epochs=2, max_steps=2)
    fit(state_b, shard.epoch, LoopHooks(evaluate=lambda s: {}))
    assert state_b.step_in_epoch == 2 and state_b.epoch == 0
    state_b.cfg = state_a.cfg
    fit(state_b, shard.epoch, LoopHooks(evaluate=lambda s: {}))
    assert state_b.step == state_a.step == 6
    for pa, pb in zip(state_a.model.parameters(), state_b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_representation_module_needs_one_shared_representation():
    from pipeline.train.step import representation_module

    with pytest.raises(ValueError, match="^strategy mgda_ub needs an architecture with one shared representation "
                                         r"\(shared_bottom, mmoe\), not SNR$"):
        build(_cfg("snr", "mgda_ub"), _spec())
    half = torch.nn.Module()
    half.experts = torch.nn.Linear(2, 2)  # experts, but no per-module forward that calls them
    with pytest.raises(ValueError, match="not Module$"):
        representation_module(half)
