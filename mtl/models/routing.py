"""Routing helpers for architectures whose task branches read a mix of shared and
task-specific expert outputs (PLE), or whose routing variables are sampled (SNR).

Kept apart from :mod:`mtl.models.layers` so that file's existing functions stay untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _PairScaledMix(torch.autograd.Function):
    """``out[k] = sum_e gates[:, k, e] * experts[e]``; the gradient reaching ``experts[e]``
    from task ``k`` is multiplied by ``scale[k, e]``. Gates get plain gradients."""

    @staticmethod
    def forward(ctx, gates: Tensor, experts: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gates, experts, scale)
        return torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gates, experts, scale = ctx.saved_tensors
        grad_bkh = grad.transpose(0, 1)  # [B, K, H]
        grad_gates = torch.bmm(grad_bkh, experts.permute(1, 2, 0))  # [B, K, E]
        scaled_gates = gates * scale.unsqueeze(0)  # [B, K, E]
        grad_experts = torch.bmm(scaled_gates.transpose(1, 2), grad_bkh).transpose(0, 1)  # [E, B, H]
        return grad_gates, grad_experts, None


def mix_experts_pair_scaled(gates: Tensor, experts: Tensor, scale: Tensor | None) -> Tensor:
    """Gate-weighted sum of expert outputs with a per-(task, expert) gradient scale.

    Generalises :func:`mtl.models.layers.mix_experts` (whose scale is per task only) to the
    case where some experts are shared tensors (gradient scaled by ``c_k``) and others belong
    to the task itself (gradient unscaled), as in the last PLE level.

    Args:
        gates: ``[B, K, E]`` per-task weights over experts.
        experts: ``[E, B, H]`` expert outputs.
        scale: ``[K, E]`` or ``None`` (= all ones, plain autograd).

    Returns ``[K, B, H]``.
    """
    if scale is None:
        return torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1)
    return _PairScaledMix.apply(gates, experts, scale)
