"""One training step's backward for a :class:`~mtl.models.base.MultiTaskModel` and a strategy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from mtl.models.base import Batch, MultiTaskModel
from mtl.strategies.base import Combination, Strategy


def per_task_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """``[K]``: binary cross-entropy with logits, mean over the batch, per task."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(0)


def model_backward(
    strategy: Strategy,
    model: MultiTaskModel,
    batch: Batch,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = per_task_bce,
    shared_parameters: Sequence[nn.Parameter] | None = None,
    direct: bool | None = None,
    representation_module: nn.Module | None = None,
    state_losses: Tensor | None = None,
    model_task_gradients: bool = True,
    separable_losses: bool | None = None,
) -> tuple[Tensor, Combination]:
    """Forward with ``task_grad_scale``, per-task losses, the strategy's combination, ONE backward.

    Afterwards shared and embedding parameters hold ``sum_i c_i w_i grad L_i`` (gradient
    strategies; ``c`` from the Gram matrix of the per-task gradients of ``shared_parameters``)
    and task-specific parameters their own task's gradient ``w_i grad L_i``.

    Args:
        strategy: the strategy.
        model: the model (its ``forward`` takes ``task_grad_scale``).
        batch: the input batch.
        labels: ``[B, K]`` labels.
        loss_fn: ``(logits [B, K], labels) -> [K]`` per-task losses.
        shared_parameters: parameters to take per-task gradients over; default
            ``model.shared_parameters()``, or ``model.last_shared_parameters()`` for strategies
            that work on the last shared layer (:attr:`Strategy.uses_last_shared_layer`:
            GradNorm).
        direct: form the shared gradient from the per-task stack instead of backpropagating it
            again (the final backward is restricted to the other parameters, so a model whose
            backward skips unused weight gradients, like the fused MMoE, saves the shared
            weight-gradient products). ``None`` (default): on when the model's
            ``shared_task_gradients`` is used, off otherwise.
        representation_module: for MGDA-UB: a module whose output is the shared representation
            (e.g. ``model.experts``); per-task gradients are taken w.r.t. that output.
        state_losses: all-reduced detached losses for loss-driven state (DDP).
        model_task_gradients: use the model's ``shared_task_gradients`` when it has one
            (``False``: always the generic per-task ``torch.autograd.grad`` calls).
        separable_losses: ``loss_fn``'s loss ``i`` reads only the logits of task ``i`` (per-task
            BCE, masked or not), which lets a model's ``shared_task_gradients`` take a cheaper
            path (``separable=``). ``None`` (default): true for :func:`per_task_bce` only.

    If the model has a method ``shared_task_gradients(losses, tasks) -> [len(tasks), P]``
    (gradients of ``losses[t]`` for ``t`` in ``tasks`` w.r.t. ``model.shared_parameters()`` for the
    last forward, flattened in parameter order, graph kept), it replaces the generic per-task
    ``torch.autograd.grad`` calls for ``model.shared_parameters()``; if the model declares the
    option ``"parameters"`` in ``shared_task_gradient_options`` (:mod:`mtl.models.base`), also
    for a subset of them (e.g. GradNorm's last shared layer), and ``"separable"`` lets it take
    the cheaper path for separable losses.

    Returns:
        ``(losses [K] detached, combination)``.
    """
    device = next(model.parameters()).device
    scale = strategy.task_grad_scale(device)
    captured: list[Tensor] = []
    handle = None
    if strategy.uses_representation and strategy.is_refresh_step():
        if representation_module is None:
            raise ValueError(f"{type(strategy).__name__} needs representation_module= (e.g. model.experts)")
        handle = representation_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(batch, task_grad_scale=scale)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None and not captured:
        raise ValueError(
            f"{type(strategy).__name__}: representation_module {type(representation_module).__name__} was not called "
            "during the model's forward (a fused forward path bypasses it); pass a module the forward calls"
        )
    losses = loss_fn(logits, labels)
    if shared_parameters is None and strategy.uses_last_shared_layer:
        shared_parameters = model.last_shared_parameters()
    whole = shared_parameters is None  # all of model.shared_parameters()
    shared = model.shared_parameters() if whole else list(shared_parameters)
    fast = getattr(model, "shared_task_gradients", None) if model_task_gradients else None
    # the options the model declares (a model without the declaration takes (losses, tasks) only)
    options = getattr(model, "shared_task_gradient_options", None) or frozenset()
    task_fn = None
    if fast is not None:
        if separable_losses is None:
            separable_losses = loss_fn is per_task_bce
        extra = {"separable": True} if separable_losses and "separable" in options else {}
        if whole:
            task_fn = lambda ls, _params, tasks: fast(ls, tasks, **extra)  # noqa: E731
        elif "parameters" in options and {id(p) for p in shared} <= {id(p) for p in model.shared_parameters()}:
            task_fn = lambda ls, params, tasks: fast(ls, tasks, parameters=params, **extra)  # noqa: E731
    if direct is None:
        direct = task_fn is not None and whole
    non_shared = None
    if direct:
        ids = {id(p) for p in shared}
        non_shared = [p for p in model.parameters() if id(p) not in ids]
    comb = strategy.backward(
        losses,
        shared_parameters=shared,
        task_grad_scale=scale,
        state_losses=state_losses,
        representation=captured[0] if captured else None,
        non_shared_parameters=non_shared,
        task_gradients_fn=task_fn,
    )
    return losses.detach(), comb

