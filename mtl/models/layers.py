"""Batched building blocks: many same-shaped MLPs (experts, towers, gates) as one matmul each.

Members (experts or towers) are stacked on a leading axis so that a whole group costs one
GEMM per layer instead of a Python loop over modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtl.models.grad_scale import LiveScale, Scale, load_scale, save_scale, scale_grad


class _SharedInputLinear(torch.autograd.Function):
    """``y = x @ W.T + b`` for ``n`` member blocks of ``W``; the gradient reaching ``x`` from
    member ``m``'s block is multiplied by ``scale[m]``. Weights get plain gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, scale: Scale) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, save_scale(ctx, scale))
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Under autocast the forward's product ran in a lower precision than the saved inputs:
        # the backward's products run in the gradient's dtype, as autocast's own backward would.
        x, weight = (t.to(grad.dtype) for t in ctx.saved_tensors[:2])
        scale = load_scale(ctx, ctx.saved_tensors[2])
        n = scale.numel()
        grad_w = grad.t().mm(x)
        grad_b = grad.sum(0)
        scaled = (grad.view(grad.shape[0], n, -1) * scale.view(1, n, 1).to(grad.dtype)).view_as(grad)
        return scaled.mm(weight), grad_w, grad_b, None


def shared_input_linear(x: Tensor, weight: Tensor, bias: Tensor, member_scale: Scale | None) -> Tensor:
    """A linear layer whose ``out_features`` are ``n`` equal member blocks reading one shared
    input; ``member_scale`` (``[n]`` or ``None``) scales each block's gradient into ``x``."""
    if member_scale is None:
        return F.linear(x, weight, bias)
    return _SharedInputLinear.apply(x, weight, bias, member_scale)


class BatchedMLP(nn.Module):
    """``num_members`` MLPs of identical shape evaluated together.

    Args:
        num_members: how many MLPs (experts, towers).
        in_dim: input width.
        hidden: layer widths; ReLU after each hidden layer.
        out_dim: optional final linear layer width (no activation), e.g. 1 for tower logits.
        shared_input: the input is one ``[B, in_dim]`` tensor read by every member (the first
            layer is then one ``Linear(in_dim, num_members * hidden[0])``); otherwise the input
            is ``[num_members, B, in_dim]``.
        dropout: in training mode, each hidden layer's output (after its ReLU) is zeroed with
            this probability per entry and the rest scaled by ``1 / (1 - dropout)`` (inverted
            dropout; the identity in eval mode); never after the ``out_dim`` layer. 0 = off.

    Returns ``[num_members, B, width]`` from :meth:`forward`.

    Example:
        >>> mlp = BatchedMLP(4, 97, [128, 64])
        >>> mlp(torch.randn(8, 97)).shape
        torch.Size([4, 8, 64])
    """

    def __init__(
        self,
        num_members: int,
        in_dim: int,
        hidden: list[int],
        out_dim: int | None = None,
        shared_input: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_dim, *hidden] + ([out_dim] if out_dim is not None else [])
        if len(widths) < 2:
            raise ValueError("BatchedMLP needs at least one layer")
        check_dropout(dropout)
        self.dropout = float(dropout)
        self.num_members = num_members
        self.shared_input = shared_input
        self.num_hidden = len(hidden)
        self.out_width = widths[-1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            # [n, fan_in, fan_out] so that bmm(x[n, B, fan_in], w) needs no transpose.
            self.weights.append(nn.Parameter(torch.empty(num_members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_members, 1, fan_out).uniform_(-bound, bound)))

    def last_layer(self) -> list[nn.Parameter]:
        """The weight and bias of the last layer (the one whose output the MLP returns)."""
        return [self.weights[-1], self.biases[-1]]

    def forward(self, x: Tensor, member_scale: Scale | None = None) -> Tensor:
        """Args:
        x: ``[B, in_dim]`` (shared input) or ``[num_members, B, in_dim]``.
        member_scale: ``[num_members]`` gradient scale where member ``m`` reads a shared input
            (``task_grad_scale`` of :class:`mtl.models.base.MultiTaskModel`); ``None`` = 1.
        """
        last = len(self.weights) - 1
        for layer, w in enumerate(self.weights):
            if layer == last and layer >= self.num_hidden and torch.is_autocast_enabled(x.device.type):
                # The output layer (e.g. the logits) in the parameters' dtype: outputs rounded to
                # bfloat16 would tie many scores (a step of 1/64 around |logit| ~ 3).
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return self._layer(layer, x.to(w.dtype), member_scale)
            x = self._layer(layer, x, member_scale)
        return x

    def _layer(self, layer: int, x: Tensor, member_scale: Scale | None) -> Tensor:
        n = self.num_members
        w, b = self.weights[layer], self.biases[layer]
        if layer == 0 and self.shared_input:
            fan_in, fan_out = w.shape[1], w.shape[2]
            flat_w = w.permute(0, 2, 1).reshape(n * fan_out, fan_in)
            h = shared_input_linear(x, flat_w, b.reshape(n * fan_out), member_scale)
            x = h.view(-1, n, fan_out).transpose(0, 1)
        else:
            if layer == 0 and member_scale is not None:
                x = scale_grad(x, member_scale.view(n, 1, 1))
            x = torch.baddbmm(b, x, w)
        if layer >= self.num_hidden:
            return x
        x = torch.relu(x)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


def check_dropout(p: float) -> None:
    """A dropout probability must be in ``[0, 1)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


def mix_experts(gates: Tensor, experts: Tensor, task_scale: Scale | None = None) -> Tensor:
    """Gate-weighted sum of expert outputs, one mixture per task.

    Args:
        gates: ``[B, K, E]`` per-task distributions over experts.
        experts: ``[E, B, H]`` expert outputs.
        task_scale: ``[K]``: task ``k``'s gradient into ``experts`` is multiplied by
            ``task_scale[k]``; or ``[K, E]``: per (task, expert) pair, as where a task mixes
            shared experts with its own (gates get plain gradients).

    Returns ``[K, B, H]``.
    """
    if task_scale is None:
        return torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1)
    return _ScaledMix.apply(gates, experts, task_scale)


class _ScaledMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates: Tensor, experts: Tensor, scale: Scale) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gates, experts, save_scale(ctx, scale))
        return torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gates, experts, saved = ctx.saved_tensors
        scale = load_scale(ctx, saved)
        gates, experts = gates.to(grad.dtype), experts.to(grad.dtype)  # autocast: see _SharedInputLinear
        grad_bkh = grad.transpose(0, 1)  # [B, K, H]
        grad_gates = torch.bmm(grad_bkh, experts.permute(1, 2, 0))  # [B, K, E]
        scaled_gates = gates * scale.view(1, gates.shape[1], -1).to(grad.dtype)  # [K] or [K, E] scale
        grad_experts = torch.bmm(scaled_gates.transpose(1, 2), grad_bkh).transpose(0, 1)  # [E, B, H]
        return grad_gates, grad_experts, None


def stacked_owners(mlp: BatchedMLP, owner_of_member: Tensor | None = None) -> list[tuple[nn.Parameter, Tensor]]:
    """Row ownership of a :class:`BatchedMLP` whose members are tasks (member ``m`` belongs to
    task ``owner_of_member[m]``, default ``m``), for ``task_parameter_owners``."""
    owner = torch.arange(mlp.num_members) if owner_of_member is None else owner_of_member
    return [(p, owner) for p in mlp.parameters()]
