"""Identity with a scaled gradient: the primitive behind ``task_grad_scale``."""

from __future__ import annotations

import torch
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_grad(x: Tensor, scale: Tensor | None) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward.

    ``scale`` broadcasts against ``x`` (a scalar, or e.g. ``[K, 1, 1]`` against ``[K, B, H]``).
    """
    if scale is None:
        return x
    return _ScaleGrad.apply(x, scale)
