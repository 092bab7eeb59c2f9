"""Identity with a scaled gradient: the primitive behind ``task_grad_scale``.

A strategy fills ``task_grad_scale`` only after the forward pass (it needs the per-task
gradients of that forward to compute the coefficients), so every gradient scale must be read
when the backward runs, not copied in the forward. A scale derived from it (a per-member
index, a mask of which tasks read a shared tensor) is therefore a :class:`LiveScale`: the live
base tensor and how to derive the scale, evaluated in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class LiveScale:
    """``derive(base)`` evaluated when asked (in the backward), so that in-place updates of
    ``base`` after the forward (the strategy filling ``task_grad_scale``) are seen.

    Example:
        >>> c = torch.ones(2)
        >>> s = LiveScale(c, lambda c: c[torch.tensor([1, 1, 0])])
        >>> _ = c.copy_(torch.tensor([2.0, 3.0]))
        >>> s.resolve()
        tensor([3., 3., 2.])
    """

    def __init__(self, base: Tensor, derive: Callable[[Tensor], Tensor]) -> None:
        self.base = base
        self.derive = derive

    def resolve(self) -> Tensor:
        return self.derive(self.base)

    def view(self, *shape: int) -> "LiveScale":
        return LiveScale(self.base, lambda b, d=self.derive: d(b).reshape(*shape))

    def numel(self) -> int:
        return self.resolve().numel()


Scale = Tensor | LiveScale


def save_scale(ctx: object, scale: Scale) -> Tensor | None:
    """In an autograd Function's forward: keep ``scale`` for the backward; returns the tensor to
    pass to ``save_for_backward`` (``None`` for a :class:`LiveScale`, kept on ``ctx``)."""
    if isinstance(scale, LiveScale):
        ctx.live_scale = scale  # type: ignore[attr-defined]
        return None
    ctx.live_scale = None  # type: ignore[attr-defined]
    return scale


def load_scale(ctx: object, saved: Tensor | None) -> Tensor:
    """In the backward: the scale's value now."""
    live = getattr(ctx, "live_scale", None)
    return live.resolve() if live is not None else saved  # type: ignore[return-value]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Scale) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(save_scale(ctx, scale))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        return grad * load_scale(ctx, saved), None


def scale_grad(x: Tensor, scale: Scale | None) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward.

    ``scale`` broadcasts against ``x`` (a scalar, or e.g. ``[K, 1, 1]`` against ``[K, B, H]``);
    it is read when the backward runs.
    """
    if scale is None:
        return x
    return _ScaleGrad.apply(x, scale)
