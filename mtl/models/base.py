"""The one interface every architecture implements.

A model maps a batch to per-task logits ``[B, K]`` and states which parameters are shared:

- :meth:`MultiTaskModel.embedding_parameters` — embedding tables (shared by all tasks, sparse
  rows; balancing strategies never take per-task gradients of these),
- :meth:`MultiTaskModel.shared_parameters` — dense parameters that several tasks' losses reach
  (experts, bottoms); the parameters gradient surgery works on,
- :meth:`MultiTaskModel.task_specific_parameters` — parameters (towers, gates, routing
  variables) each row of which only one task's loss reaches. Architectures stack same-shaped
  per-task modules into one tensor for speed, so ownership is stated per row along dim 0 by
  :meth:`MultiTaskModel.task_parameter_owners`.

Every parameter is in exactly one of these groups.

:meth:`MultiTaskModel.last_shared_parameters` names the shared layer closest to the towers (the
last layer of every shared block whose output task-specific code reads; GradNorm's ``W``): a
subset of :meth:`MultiTaskModel.shared_parameters` through which every other shared parameter
reaches the logits.

Optional batched per-task gradients: an architecture may implement
``shared_task_gradients(losses, tasks, **options) -> [len(tasks), P]`` (the gradients of
``losses[t]`` w.r.t. :meth:`MultiTaskModel.shared_parameters` for the last forward, flattened in
parameter order, graph kept) and must then declare the keyword options it accepts in
:attr:`MultiTaskModel.shared_task_gradient_options` (``"separable"``, ``"parameters"``); the
strategy driver reads that declaration instead of inspecting signatures.

Task-gradient scaling (``task_grad_scale``): when a ``[K]`` tensor ``c`` is passed to
``forward``, the returned logits are numerically unchanged, but in the backward pass every
point where task ``i``'s branch reads a shared tensor multiplies the gradient by ``c[i]``.
Backpropagating the plain sum ``sum_i L_i`` then gives task-specific parameters their own
task's plain gradient, and shared and embedding parameters ``sum_i c_i * grad(L_i)``: one
backward pass implements any strategy whose shared update is a linear combination of task
gradients (see ``shared/docs/surgery_under_ddp.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.inputs import InputModule
from mtl.precision import Precision, check_precision, resolve_compute_dtype

Batch = Mapping[str, Tensor]


class MultiTaskModel(nn.Module, ABC):
    """Base class: input module + architecture body producing ``[B, K]`` logits.

    Args:
        spec: the feature spec; ``spec.tasks`` gives the task order of the logits.
        sparse_gradients: embedding tables produce row-sparse gradients.
        compute_dtype: precision of the body's products and activations (:mod:`mtl.precision`:
            ``None``/``"float32"`` exact, ``"bfloat16"`` mixed precision, ``"auto"`` bfloat16
            where the device has native bfloat16 matrix units; float64 models are never
            down-cast). Parameters, gradients and the returned logits keep the input's dtype, and
            the logits are computed in it (the last, width-1 layer runs outside the low precision).
            The generic architectures run their body under ``torch.autocast`` in :meth:`forward`;
            MMoE's fused body casts itself.
    """

    #: the architecture applies :attr:`compute_dtype` inside ``forward_representation`` itself
    casts_itself: bool = False
    #: ``None``: no ``shared_task_gradients`` method; otherwise the keyword options that method
    #: accepts besides ``(losses, tasks)``: ``"separable"`` (losses read only their own task's
    #: logits) and/or ``"parameters"`` (a subset of :meth:`shared_parameters`)
    shared_task_gradient_options: frozenset[str] | None = None

    def __init__(self, spec: FeatureSpec, sparse_gradients: bool = False, compute_dtype: Precision = None) -> None:
        super().__init__()
        if spec.num_tasks < 1:
            raise ValueError("feature spec has no tasks")
        self.spec = spec
        self.task_names = list(spec.tasks)
        self.num_tasks = spec.num_tasks
        self.inputs = InputModule(spec, sparse_gradients=sparse_gradients)
        self.compute_dtype: Precision = check_precision(compute_dtype)

    def body_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the body computes in for input ``x`` (``compute_dtype`` resolved on its device)."""
        return resolve_compute_dtype(self.compute_dtype, x.device, x.dtype)

    def forward(self, batch: Batch, task_grad_scale: Tensor | None = None) -> Tensor:
        """Per-task logits ``[B, K]``; see the module docstring for ``task_grad_scale``."""
        x = self.inputs(batch)
        dtype = self.body_dtype(x)
        if self.casts_itself or dtype == x.dtype:
            return self.forward_representation(x, task_grad_scale)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            logits = self.forward_representation(x, task_grad_scale)
        return logits.to(x.dtype)

    @abstractmethod
    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        """Logits ``[B, K]`` from the input representation ``x`` ``[B, D]``."""

    def embedding_parameters(self) -> list[nn.Parameter]:
        return self.inputs.embedding_parameters()

    @abstractmethod
    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters reached by more than one task's loss."""

    @abstractmethod
    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The shared layer closest to the towers: a subset of :meth:`shared_parameters` (the
        last layer of each shared block read by task-specific code) through which every other
        shared parameter reaches the logits; empty when nothing dense is shared. GradNorm's
        ``W`` (Chen et al. 2018 use the last shared layer)."""

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """Parameters owned by single tasks (row-wise, see :meth:`task_parameter_owners`)."""
        return [p for p, _ in self.task_parameter_owners()]

    @abstractmethod
    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        """``(param, owner)`` pairs: ``owner`` is int64 ``[param.shape[0]]``; row ``r`` of
        ``param`` (along dim 0) is reached only by the loss of task ``owner[r]``."""

    def routing_weights(self, batch: Batch) -> dict[str, Tensor]:
        """Gate / routing weights for diagnostics, e.g. ``{"gate": [B, K, E]}``; empty if none."""
        return {}

    def regularization(self) -> Tensor:
        """A penalty added to the training loss (soft-sharing L2, SNR L0); zero by default."""
        return torch.zeros((), device=next(self.parameters()).device)
