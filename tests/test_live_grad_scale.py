"""Strategies fill ``task_grad_scale`` after the forward (the coefficients need that forward's
per-task gradients). Every architecture must read the scale when the backward runs: one
``model_backward`` gives the shared parameters exactly ``sum_i c_i g_i`` for every
architecture (PLE once copied its derived scales in the forward and trained as equal weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mtl.models import build_model
from mtl.strategies import Combination, Strategy, model_backward, task_gradients
from mtl.strategies.driver import per_task_bce

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _distributed_worker as W  # noqa: E402

COEFFS = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)


class FixedCoefficients(Strategy):
    """A gradient strategy whose coefficients are known (so the test sees them applied)."""

    uses_gradients = True
    gram_only = True

    def combine(self, losses, stats, grads, gram):  # type: ignore[override]
        return Combination(loss_weights=torch.ones_like(losses), grad_scale=COEFFS.to(losses.dtype))


ARCHS = [
    ("shared_bottom", {"bottom_hidden": [8], "tower_hidden": [4]}),
    ("mmoe", {"num_experts": 3, "expert_hidden": [8], "tower_hidden": [4]}),
    ("ple", {"num_levels": 1, "num_shared_experts": 2, "task_experts": 1, "expert_hidden": [8], "tower_hidden": [4]}),
    ("ple", {"num_levels": 2, "num_shared_experts": 2, "task_experts": 1, "expert_hidden": [8], "tower_hidden": [4]}),
    ("ple", {"num_levels": 3, "num_shared_experts": 1, "task_experts": [1, 0, 2], "expert_hidden": [8], "tower_hidden": [4]}),
    ("snr", {"num_lower": 3, "lower_hidden": [8], "upper_hidden": [4]}),
]


@pytest.mark.parametrize("name,params", ARCHS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ARCHS)])
def test_scale_filled_after_forward_reaches_shared_parameters(name, params, one_torch_thread):
    torch.manual_seed(0)
    model = build_model(name, W.make_spec(), **params).double()
    model.eval()  # SNR: deterministic routing, so the two forwards below are the same function
    batch = W.make_union_batches(1, 32, 1)[0]
    feats, labels = batch.features, batch.labels.double()
    shared = model.shared_parameters()
    expected = task_gradients(per_task_bce(model(feats), labels), shared)
    expected = (COEFFS.unsqueeze(1) * expected).sum(0)
    model.zero_grad(set_to_none=True)
    model_backward(FixedCoefficients(3), model, feats, labels, model_task_gradients=False)
    got = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # and the scale really changed something: the plain sum differs
    plain = task_gradients(per_task_bce(model(feats), labels), shared).sum(0)
    assert (got - plain).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mmoe_fast_path_gives_embeddings_the_combined_gradient(dtype, one_torch_thread):
    """The training path (batched per-task gradients, direct shared write) in each body
    precision: embeddings get ``sum_i c_i grad L_i`` (the bfloat16 body once cast the scale in
    the forward, so its embeddings got the plain sum on every refresh step)."""
    torch.manual_seed(0)
    model = build_model("mmoe", W.make_spec(), compute_dtype=dtype, num_experts=3, expert_hidden=[8], tower_hidden=[4])
    batch = W.make_union_batches(1, 64, 1)[0]
    feats, labels = batch.features, batch.labels
    tables = model.embedding_parameters()

    def dense_grads() -> torch.Tensor:
        return torch.cat([p.grad.to_dense().reshape(-1) for p in tables])

    per_task = []
    for t in range(3):
        model.zero_grad(set_to_none=True)
        per_task_bce(model(feats), labels)[t].backward()
        per_task.append(dense_grads())
    expected = sum(c * g for c, g in zip(COEFFS.float(), per_task))
    plain = sum(per_task)
    model.zero_grad(set_to_none=True)
    model_backward(FixedCoefficients(3), model, feats, labels)
    got = dense_grads()
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert (got - expected).norm() <= tol * expected.norm()
    assert (got - plain).norm() > 10 * tol * expected.norm()
