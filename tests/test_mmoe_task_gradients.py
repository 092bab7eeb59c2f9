"""MMoE.shared_task_gradients (one batched per-task backward over the experts) against per-task
torch.autograd.grad, the fused backward's skipping of unused expert weight gradients, and the
strategies driver end to end with and without the model method."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import mtl.models.mmoe as mmoe
from mtl.features import DenseFeature, FeatureSpec, SparseFeature
from mtl.models import build_model
from mtl.strategies import build_strategy, model_backward, per_task_bce, task_gradients

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(k, expert_hidden, tower_hidden, rows=50, seed=0, dtype=D, compute_dtype=None, experts=3):
    torch.manual_seed(seed)
    spec = FeatureSpec(
        sparse=[SparseFeature("u", 40, 4), SparseFeature("v", 30, 3)],
        dense=[DenseFeature("d")],
        tasks=[f"t{i}" for i in range(k)],
    )
    model = build_model(
        "mmoe", spec, num_experts=experts, expert_hidden=expert_hidden, tower_hidden=tower_hidden,
        compute_dtype=compute_dtype,
    ).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {
        "u": torch.randint(0, 40, (rows,), generator=gen),
        "v": torch.randint(0, 30, (rows,), generator=gen),
        "d": torch.randn(rows, generator=gen, dtype=dtype),
    }
    labels = (torch.rand(rows, k, generator=gen) < 0.4).to(dtype)
    return model, batch, labels


SHAPES = [(2, [5], []), (4, [8, 6], [4]), (7, [6, 5, 4], [3, 2])]


@pytest.mark.parametrize("k,expert_hidden,tower_hidden", SHAPES)
@pytest.mark.parametrize("subset", [False, True])
def test_equals_per_task_autograd(k, expert_hidden, tower_hidden, subset, monkeypatch):
    monkeypatch.setattr(mmoe, "_ROW_CHUNK", 16)  # 50 rows: chunks of 16, 16, 16, 2
    model, batch, labels = _setup(k, expert_hidden, tower_hidden)
    losses = per_task_bce(model(batch), labels)
    tasks = [k - 1, 0] if subset else None
    fast = model.shared_task_gradients(losses, tasks)
    ref = task_gradients(losses, model.shared_parameters(), tasks)
    assert fast.dtype == D and fast.shape == ref.shape
    assert fast.shape == (k if not subset else 2, sum(p.numel() for p in model.shared_parameters()))
    assert ref.abs().max() > 0
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-13)
    for p in model.parameters():  # nothing accumulated, graph kept
        assert p.grad is None
    losses.sum().backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    if not subset:
        torch.testing.assert_close(fast.sum(0), total, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("k,expert_hidden,tower_hidden", SHAPES)
def test_task_grad_scale_and_losses_mixing_tasks(k, expert_hidden, tower_hidden, monkeypatch):
    """With a task_grad_scale, per-task autograd through the fused backward scales task i's
    branch by c_i; losses may read several tasks' logits (the Jacobian is not diagonal)."""
    monkeypatch.setattr(mmoe, "_ROW_CHUNK", 32)
    model, batch, labels = _setup(k, expert_hidden, tower_hidden, seed=3)
    scale = torch.linspace(0.3, 2.0, k)
    logits = model(batch, task_grad_scale=scale)
    plain = per_task_bce(logits, labels)
    mixed = plain + 0.5 * plain.roll(1) + (logits[:, 0] * logits[:, -1]).mean()
    for losses in (plain, mixed):
        fast = model.shared_task_gradients(losses)
        ref = task_gradients(losses, model.shared_parameters())
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-13)
    # the scale is applied, not ignored: unscaled rows differ by exactly c_i
    model2, batch2, labels2 = _setup(k, expert_hidden, tower_hidden, seed=3)
    unscaled = model2.shared_task_gradients(per_task_bce(model2(batch2), labels2))
    torch.testing.assert_close(model.shared_task_gradients(plain), unscaled * scale.to(D).view(-1, 1))


@pytest.mark.parametrize("k,expert_hidden,tower_hidden", SHAPES)
@pytest.mark.parametrize("tasks", [None, "subset"])
def test_separable_losses_path_equals_autograd(k, expert_hidden, tower_hidden, tasks, monkeypatch):
    """separable=True (loss t reads only logit t: per-task BCE, masked or not) gives the same
    rows as per-task autograd.grad, with a task_grad_scale, a task subset in any order and a
    parameter subset; and it is really the separable path (wrong on a loss that mixes tasks)."""
    monkeypatch.setattr(mmoe, "_ROW_CHUNK", 16)
    model, batch, labels = _setup(k, expert_hidden, tower_hidden, seed=7)
    scale = torch.linspace(1.5, 0.4, k)
    logits = model(batch, task_grad_scale=scale)
    mask = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(8)) < 0.7).to(D)
    losses = (torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask).sum(0)
    order = None if tasks is None else [k - 1, 0]
    ref = task_gradients(losses, model.shared_parameters(), order)
    torch.testing.assert_close(model.shared_task_gradients(losses, order, separable=True), ref, rtol=1e-10, atol=1e-13)
    last = [model.experts.weights[-1], model.experts.biases[-1]]
    torch.testing.assert_close(
        model.shared_task_gradients(losses, order, parameters=last, separable=True),
        task_gradients(losses, last, order), rtol=1e-10, atol=1e-13,
    )
    mixed = losses + 0.5 * losses.roll(1)
    general = model.shared_task_gradients(mixed, order)
    torch.testing.assert_close(general, task_gradients(mixed, model.shared_parameters(), order), rtol=1e-10, atol=1e-13)
    assert not torch.allclose(model.shared_task_gradients(mixed, order, separable=True), general)


def test_driver_takes_the_separable_path_for_per_task_bce_only(monkeypatch):
    calls: list[bool] = []
    model, batch, labels = _setup(3, [6], [3])
    original = model.shared_task_gradients

    def spy(losses, tasks=None, parameters=None, separable=False):
        calls.append(separable)
        return original(losses, tasks, parameters=parameters, separable=separable)

    monkeypatch.setattr(model, "shared_task_gradients", spy)
    model_backward(build_strategy("pcgrad", 3), model, batch, labels)
    model_backward(build_strategy("pcgrad", 3), model, batch, labels, loss_fn=lambda lg, y: per_task_bce(lg, y) * 2)
    model_backward(build_strategy("pcgrad", 3), model, batch, labels,
                   loss_fn=lambda lg, y: per_task_bce(lg, y) * 2, separable_losses=True)
    assert calls == [True, False, True]


def test_plain_layout_branch_and_single_chunk(monkeypatch):
    monkeypatch.setattr(mmoe, "PLAIN_LAYOUTS", True)  # the separate contiguous first-layer copy
    model, batch, labels = _setup(4, [8, 6], [4], rows=40, seed=5)
    losses = per_task_bce(model(batch), labels)
    torch.testing.assert_close(
        model.shared_task_gradients(losses, [2, 1]), task_gradients(losses, model.shared_parameters(), [2, 1]),
        rtol=1e-10, atol=1e-13,
    )


def test_bfloat16_body_close_to_autograd():
    model, batch, labels = _setup(3, [8, 6], [4], rows=64, seed=2, dtype=torch.float32, compute_dtype="bfloat16")
    losses = per_task_bce(model(batch), labels)
    fast = model.shared_task_gradients(losses)
    ref = task_gradients(losses, model.shared_parameters())
    assert fast.dtype == torch.float32
    assert float((fast - ref).abs().max() / ref.abs().max()) < 3e-2


def test_errors():
    model, batch, labels = _setup(3, [6], [3])
    with pytest.raises(RuntimeError, match="no live graph"):
        model.shared_task_gradients(torch.zeros(3))
    losses = per_task_bce(model(batch), labels)
    with pytest.raises(ValueError, match="out of range"):
        model.shared_task_gradients(losses, [0, 3])
    with pytest.raises(ValueError, match="1-D"):
        model.shared_task_gradients(losses.view(1, 3))
    with pytest.raises(RuntimeError, match="do not depend"):
        model.shared_task_gradients(losses.detach() * 2)
    with pytest.raises(RuntimeError, match="do not depend"):  # a graph, but not through the logits
        model.shared_task_gradients(model.gates.weight.sum() * torch.ones(3, dtype=D))
    losses.sum().backward()  # frees the graph
    with pytest.raises(RuntimeError, match="freed"):
        model.shared_task_gradients(losses)
    # the per-module path is not the fused body: refused, not silently read from an old graph
    keep = per_task_bce(model(batch), labels)
    model.forward_representation = model.forward_modules
    with pytest.raises(RuntimeError, match="no live graph"):
        model.shared_task_gradients(per_task_bce(model(batch), labels))
    del keep
    with torch.no_grad():
        model.forward_representation = type(model).forward_representation.__get__(model)
        model(batch)
    with pytest.raises(RuntimeError, match="no live graph"):
        model.shared_task_gradients(losses)


def test_model_with_record_pickles_and_copies():
    model, batch, labels = _setup(2, [5], [])
    losses = per_task_bce(model(batch), labels)
    clone = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for m in (clone, loaded):
        with pytest.raises(RuntimeError, match="no live graph"):
            m.shared_task_gradients(losses)
        out = per_task_bce(m(batch), labels)
        torch.testing.assert_close(m.shared_task_gradients(out), model.shared_task_gradients(losses))


@pytest.mark.parametrize("scaled", [False, True])
def test_backward_restricted_to_other_parameters_skips_expert_grads(scaled):
    """backward(inputs=non-expert parameters): experts get no gradient, everything else the
    same as the full backward (the fused body skips the experts' weight-gradient products)."""
    model, batch, labels = _setup(4, [8, 6], [4], seed=4)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.0]) if scaled else None
    per_task_bce(model(batch, task_grad_scale=scale), labels).sum().backward()
    full = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    shared = {id(p) for p in model.shared_parameters()}
    others = [p for p in model.parameters() if id(p) not in shared]
    torch.autograd.backward(per_task_bce(model(batch, task_grad_scale=scale), labels).sum(), inputs=others)
    for p in model.shared_parameters():
        assert p.grad is None
    for p in others:
        torch.testing.assert_close(p.grad, full[id(p)], rtol=1e-12, atol=1e-15)
    # autograd.grad over the experts (leaf inputs captured, not executed) still gets them
    losses = per_task_bce(model(batch, task_grad_scale=scale), labels)
    gs = torch.autograd.grad(losses.sum(), model.shared_parameters())
    for p, g in zip(model.shared_parameters(), gs):
        torch.testing.assert_close(g, full[id(p)], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("embedding_grad", ["combined", "plain"])
@pytest.mark.parametrize("refresh", [1, 2])
def test_driver_same_gradients_with_and_without_model_method(embedding_grad, refresh):
    """PCGrad (fixed seed) through model_backward: the model's batched per-task gradients (and
    the direct final backward they enable by default) give the same parameter gradients and
    coefficients as the generic torch.autograd.grad path, step after step."""
    k = 4
    runs = []
    for use_model in (True, False):
        model, batch, labels = _setup(k, [8, 6], [4], rows=64, seed=6, dtype=torch.float32)
        strategy = build_strategy("pcgrad", k, seed=11, refresh_every=refresh, embedding_grad=embedding_grad)
        calls = []
        if use_model:
            inner = model.shared_task_gradients
            model.shared_task_gradients = lambda ls, tasks: calls.append(list(tasks)) or inner(ls, tasks)
            model.shared_task_gradient_options = frozenset()  # the replacement takes no options
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        steps = []
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            _, comb = model_backward(strategy, model, batch, labels, model_task_gradients=use_model)
            steps.append(([p.grad.clone() for p in model.parameters()], comb.grad_scale.clone()))
            opt.step()
        expect_calls = [list(range(k - 1 if embedding_grad == "plain" else k))] * (3 if refresh == 1 else 2)
        assert calls == (expect_calls if use_model else [])
        runs.append(steps)
    for (ga, ca), (gb, cb) in zip(*runs):
        torch.testing.assert_close(ca, cb, rtol=1e-4, atol=1e-6)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k,expert_hidden,tower_hidden", SHAPES)
def test_parameter_subset(k, expert_hidden, tower_hidden, monkeypatch):
    """``parameters=``: the columns of those parameters, in the order given (only the layers
    from the lowest named one upwards are backpropagated)."""
    monkeypatch.setattr(mmoe, "_ROW_CHUNK", 16)
    model, batch, labels = _setup(k, expert_hidden, tower_hidden, seed=8)
    losses = per_task_bce(model(batch), labels)
    w, b = model.experts.weights, model.experts.biases
    for subset in ([w[-1], b[-1]], [b[-1], w[-1]], [b[0]], [w[0], b[-1]]):
        fast = model.shared_task_gradients(losses, [k - 1, 0], parameters=subset)
        ref = task_gradients(losses, subset, [k - 1, 0])
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="subset"):
        model.shared_task_gradients(losses, parameters=[model.gates.weight])


def test_gradnorm_last_layer_through_model_method():
    """GradNorm on the last shared layer: the driver uses the model's method with
    ``parameters=`` and gets the same weights and gradients as the generic path."""
    k = 3
    runs = []
    for use_model in (True, False):
        model, batch, labels = _setup(k, [8, 6], [4], rows=64, seed=9, dtype=torch.float32)
        strategy = build_strategy("gradnorm", k)
        last = [model.experts.weights[-1], model.experts.biases[-1]]
        calls = []
        if use_model:
            inner = model.shared_task_gradients

            def spy(ls, tasks, parameters=None):
                calls.append([tuple(p.shape) for p in parameters])
                return inner(ls, tasks, parameters=parameters)

            model.shared_task_gradients = spy
            model.shared_task_gradient_options = frozenset({"parameters"})
        out = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            _, comb = model_backward(strategy, model, batch, labels, shared_parameters=last, model_task_gradients=use_model)
            out.append(([p.grad.clone() for p in model.parameters()], comb.loss_weights.clone()))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        assert calls == ([[tuple(p.shape) for p in last]] * 3 if use_model else [])
        runs.append(out)
    for (ga, wa), (gb, wb) in zip(*runs):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_plain_embedding_mode_on_a_parameter_subset_through_model_method():
    """A Gram strategy with ``embedding_grad="plain"`` on an explicit subset of the shared
    parameters asks the model's method (``parameters=``) for the first ``K - 1`` tasks only and
    gets the same gradients as the generic path."""
    k = 3
    runs = []
    for use_model in (True, False):
        model, batch, labels = _setup(k, [8, 6], [4], rows=64, seed=10, dtype=torch.float32)
        last = [model.experts.weights[-1], model.experts.biases[-1]]
        calls = []
        if use_model:
            inner = model.shared_task_gradients

            def spy(ls, tasks, parameters=None, separable=False):
                calls.append((list(tasks), len(parameters), separable))
                return inner(ls, tasks, parameters=parameters, separable=separable)

            model.shared_task_gradients = spy
        _, comb = model_backward(build_strategy("cagrad", k, embedding_grad="plain"), model, batch, labels,
                                 shared_parameters=last, model_task_gradients=use_model)
        assert calls == ([(list(range(k - 1)), 2, True)] if use_model else [])
        runs.append(([p.grad.clone() for p in model.parameters()], comb.grad_scale))
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
