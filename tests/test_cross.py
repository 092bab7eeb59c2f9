"""DCN-v2 cross networks (mtl/models/cross.py): each layer equals the paper's formula, member by
member; ``member_scale`` scales each member's gradient into the shared input."""

from __future__ import annotations

import pytest
import torch

from mtl.models.cross import BatchedCrossNet, expert_block


def _reference(net: BatchedCrossNet, x: torch.Tensor, member: int) -> torch.Tensor:
    """Member ``member``'s cross layers written out from Wang et al. 2021 with explicit matrices
    (``W x`` with ``W = weight[m].T``; low rank ``U V^T x``; DCN-Mix eq. 4-5)."""
    x0 = xl = x.double()
    for layer in net.cross:
        p = {k: v[member].double() for k, v in layer.items()}
        b = p["bias"][0]
        if net.rank is None:
            xl = x0 * (xl @ p["weight"] + b) + xl  # (W x)^T = x^T W^T; weight holds W^T
        elif net.mixtures == 1:
            w = p["u"][0].T @ p["v"][0].T  # W = U V^T as a [d, d] matrix
            xl = x0 * (xl @ w.T + b) + xl
        else:
            mix = torch.zeros_like(xl)
            gates = torch.softmax(xl @ p["gate"], dim=-1)  # [B, M]
            for i in range(net.mixtures):
                e_i = x0 * (torch.tanh(torch.tanh(xl @ p["v"][i]) @ p["c"][i]) @ p["u"][i] + b)
                mix = mix + gates[:, i : i + 1] * e_i
            xl = mix + xl
    return xl


@pytest.mark.parametrize("rank,mixtures", [(None, 1), (3, 1), (2, 3)])
def test_cross_layers_equal_the_formula(rank: int | None, mixtures: int) -> None:
    torch.manual_seed(0)
    net = BatchedCrossNet(3, 5, [], layers=2, rank=rank, mixtures=mixtures)
    with torch.no_grad():  # non-zero biases, so that the bias term is checked too
        for layer in net.cross:
            layer["bias"].normal_()
    x = torch.randn(4, 5)
    out = net(x)
    assert out.shape == (3, 4, 5)
    for m in range(3):
        torch.testing.assert_close(out[m].double(), _reference(net, x, m), rtol=1e-5, atol=1e-6)
    # per-member inputs give the same numbers as one shared input
    member_net = BatchedCrossNet(3, 5, [], layers=2, rank=rank, mixtures=mixtures, shared_input=False)
    member_net.load_state_dict(net.state_dict())
    torch.testing.assert_close(member_net(x.expand(3, 4, 5)), out)


def test_member_scale_scales_each_members_input_gradient() -> None:
    torch.manual_seed(1)
    net = BatchedCrossNet(3, 4, [6], layers=2, rank=2)
    x = torch.randn(5, 4, requires_grad=True)
    weights = torch.randn(3, 5, 6)
    per_member = [torch.autograd.grad((net(x)[m] * weights[m]).sum(), x)[0] for m in range(3)]
    scale = torch.tensor([0.5, -2.0, 3.0])
    out = net(x, scale)
    torch.testing.assert_close(out, net(x))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(grad, sum(scale[m] * per_member[m] for m in range(3)))


def test_expert_block_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="set the expert type to 'cross'"):
        expert_block("mlp", 2, 4, [3], cross={"layers": 2})
    with pytest.raises(ValueError, match="unknown"):
        expert_block("cross", 2, 4, [3], cross={"depth": 2})
    with pytest.raises(ValueError, match="expert type 'tree'"):
        expert_block("tree", 2, 4, [3])
    with pytest.raises(ValueError, match="needs"):
        BatchedCrossNet(2, 4, [3], mixtures=2)
