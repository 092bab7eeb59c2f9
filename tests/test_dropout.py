"""Dropout in the batched MLPs (experts, towers, bottoms; ``dropout`` model param): the stated
rate and the inverted-dropout scaling in training mode, the identity in eval mode (so
evaluation is deterministic and equals the model without dropout), off by default, and every
architecture that takes it training through the shared step."""

from __future__ import annotations

import pytest
import torch

from mtl.features import DenseFeature, FeatureSpec, SparseFeature
from mtl.models import build_model
from mtl.models.layers import BatchedMLP
from pipeline.train.config import TrainConfig
from pipeline.train.step import build, train_step
from tests.test_train_step import _data, _spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _positive_mlp(dropout: float) -> BatchedMLP:
    """Positive weights, zero biases: with a positive input no ReLU output is zero, so every
    zero in the output is a dropped entry."""
    torch.manual_seed(0)
    mlp = BatchedMLP(3, 16, [64, 32], dropout=dropout)
    with torch.no_grad():
        for w, b in zip(mlp.weights, mlp.biases):
            w.abs_()
            b.zero_()
    return mlp


def test_train_mode_drops_at_the_stated_rate_and_rescales():
    torch.manual_seed(1)
    x = torch.rand(2000, 16) + 0.1
    plain = _positive_mlp(0.0)
    expected_first = torch.relu(x @ plain.weights[0][0])  # member 0, first hidden layer
    dropped = _positive_mlp(0.25).train()
    h = dropped._layer(0, x, None)  # [3, B, 64] after ReLU and dropout
    zero = (h == 0).float().mean().item()
    assert abs(zero - 0.25) < 0.01  # 384,000 entries: std of the share ~0.0007
    kept = h[0] != 0
    assert torch.allclose(h[0][kept], expected_first[kept] / 0.75, rtol=1e-5)
    out = dropped(x)  # the last hidden layer is dropped too (expert outputs)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01


def test_eval_mode_is_deterministic_and_equals_no_dropout():
    x = torch.rand(64, 16)
    dropped, plain = _positive_mlp(0.5).eval(), _positive_mlp(0.0)
    first = dropped(x)
    assert torch.equal(first, dropped(x)) and torch.equal(first, plain(x))
    dropped.train()
    assert not torch.equal(dropped(x), first)


def test_out_dim_layer_is_never_dropped():
    torch.manual_seed(0)
    tower = BatchedMLP(2, 8, [], out_dim=1, dropout=0.9).train()  # only the output layer
    x = torch.randn(100, 8)
    assert torch.equal(tower(x), tower.eval()(x))


def test_bad_rate_is_rejected():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        BatchedMLP(2, 4, [4], dropout=1.0)


ARCHITECTURES = {
    "mmoe": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [8]},
    "ple": {"num_levels": 2, "num_shared_experts": 1, "expert_hidden": [8], "tower_hidden": [4]},
    "shared_bottom": {"bottom_hidden": [8], "tower_hidden": [4]},
    "single_task": {"hidden": [8]},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_models_take_dropout_and_evaluate_deterministically(name):
    spec = FeatureSpec(sparse=[SparseFeature("u", 50, 4)], dense=[DenseFeature("x")], tasks=["a", "b"])
    batch = {"u": torch.randint(0, 50, (256,)), "x": torch.randn(256)}
    torch.manual_seed(3)
    with_dropout = build_model(name, spec, dropout=0.5, **ARCHITECTURES[name])
    torch.manual_seed(3)
    without = build_model(name, spec, **ARCHITECTURES[name])
    with_dropout.eval(), without.eval()
    assert torch.equal(with_dropout(batch), without(batch))  # same weights; dropout off in eval
    with_dropout.train(), without.train()
    assert torch.equal(without(batch), without(batch))  # off by default
    assert not torch.equal(with_dropout(batch), with_dropout(batch))


def test_mmoe_with_dropout_trains_through_the_step():
    """A training step of an MMoE with dropout runs the per-module body (the fused kernel has no
    dropout); the config accepts the param."""
    cfg = TrainConfig(seed=5, precision="float32", torch_threads=1, batch_size=16, optimizer={"lr": 0.05},
                      model={"name": "mmoe", "params": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [8],
                                                        "dropout": 0.2}})
    state = build(cfg, _spec())
    assert state.model.shared_task_gradients is None  # per-task gradients by autograd
    batch = _data(16, seed=1)
    before = [p.detach().clone() for p in state.model.experts.parameters()]
    losses = train_step(state, batch)
    assert torch.isfinite(losses).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.experts.parameters()))
    with pytest.raises(ValueError, match="dropout"):
        build(cfg.model_copy(update={"model": cfg.model.model_copy(update={"params": {"dropout": 1.0}})}), _spec())
