"""The strategy contract: per-task losses (and, where needed, per-task gradients of the declared
dense shared parameters) in, one combined update out.

A strategy returns a :class:`Combination`:

- ``loss_weights`` ``w`` ``[K]``: the final backward is of ``sum_i w_i * L_i`` (+ ``extra_loss``).
  Loss-weighting methods (static, Uncertainty, DWA, FAMO, GradNorm) put their weights here, so
  every parameter, towers included, sees ``w_i * grad L_i`` — the weighted objective of their
  papers.
- ``grad_scale`` ``c`` ``[K]``: gradient methods (PCGrad, GradVac, MGDA(-UB), CAGrad, IMTL-G,
  Nash-MTL, Aligned-MTL) whose shared update is ``sum_i c_i g_i``. ``c`` is computed from the
  ``K x K`` Gram matrix ``G G^T`` of the per-task gradients of the shared parameters and applied
  through the model's ``task_grad_scale`` contract (:mod:`mtl.models.base`): one backward of the
  plain sum gives shared and embedding parameters ``sum_i c_i g_i`` and task-specific
  parameters (towers, gates) their own task's plain gradient, as in the papers.
- ``shared_grad``: a flat gradient written directly to the shared parameters (DB-MTL, whose
  shared update uses an EMA of past task gradients and is not a combination of this step's).

Without a model that supports ``task_grad_scale`` (plain ``losses`` + ``shared_parameters``,
the API of the Nash-MTL/FAMO reference code), the shared gradient ``sum_i c_i g_i`` is written
directly from the stacked per-task gradients and every other parameter gets the gradient of
``sum_i w_i L_i``.

Cost: per-task gradients are taken only over the declared dense shared parameters (``K`` calls
of ``torch.autograd.grad``, never over the embedding tables), then ONE backward. With
``refresh_every=N`` the coefficients are recomputed every ``N``-th step and reused (through
``task_grad_scale``) in between, so those steps cost a plain step. No ``.item()`` or other
device-to-host read is made in the step path (``tests/test_strategies.py`` records every
operator of a step and fails on a host read), except the finite-loss check on CPU tensors (where
a read costs nothing) and Aligned-MTL's ``torch.linalg.eigh``, whose error check reads one flag
on CUDA. On accelerators the finite-loss check is deferred (``check_finite="auto"``).

Data parallelism (``shared/docs/surgery_under_ddp.md``):

- ordering 1 (combine per rank, then the normal DDP all-reduce of the one backward): the
  default — coefficients come from the local Gram matrix;
- ordering 2 (global): set :attr:`Strategy.grad_reducer` to a function that all-reduces (means)
  the ``[K, P]`` stack of task gradients; every rank then computes identical coefficients from
  the global Gram matrix and the one weighted backward's DDP all-reduce yields exactly
  ``sum_i c_i mean_r g_{r,i}``;
- a cheaper middle way: :attr:`Strategy.gram_reducer` all-reduces the ``K x K`` Gram matrices
  (identical coefficients on every rank, but from the mean of local Gram matrices);
- loss-driven state (DWA, FAMO, GradNorm's loss ratios): pass all-reduced losses as
  ``state_losses=`` or set :attr:`Strategy.stat_reducer`; randomness (PCGrad, GradVac task
  order) comes from a seeded ``torch.Generator`` held in the strategy's state, so identical on
  every rank.

NaN handling: a non-finite loss raises :class:`ValueError` naming the tasks (``check_finite``):
at once for CPU losses; on accelerators at the caller's next :meth:`Strategy.raise_if_nonfinite`
(trainers call it when they log, which reads from the device anyway), naming the first bad step.
An all-zero task gradient is handled per strategy, as documented in each class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class NonFiniteLossError(ValueError):
    """A task's loss is NaN or infinite; ``tasks`` (indices), ``step`` and ``losses`` say where."""

    def __init__(self, message: str, tasks: list[int] | None = None, step: int = -1,
                 losses: list[float] | None = None) -> None:
        super().__init__(message)
        self.tasks, self.step, self.losses = list(tasks or []), step, list(losses or [])

    def __reduce__(self) -> tuple:  # pickles whole (Ray sends a worker's error to the driver)
        return (type(self), (str(self), self.tasks, self.step, self.losses))


@dataclass
class Combination:
    """What a strategy asks the backward pass to do (see the module docstring).

    Args:
        loss_weights: ``[K]`` weights of the losses in the final backward.
        grad_scale: ``[K]`` coefficients ``c`` of the shared gradient ``sum_i c_i g_i`` (``g_i``
            the gradient of the *weighted* loss ``w_i L_i``), or ``None`` (plain sum).
        shared_grad: flat ``[P]`` shared-parameter gradient written directly, or ``None``.
        extra_loss: a scalar added to the final loss (Uncertainty weighting's regulariser).
    """

    loss_weights: Tensor
    grad_scale: Tensor | None = None
    shared_grad: Tensor | None = None
    extra_loss: Tensor | None = None

    def detached(self) -> "Combination":
        return Combination(
            self.loss_weights.detach(),
            None if self.grad_scale is None else self.grad_scale.detach(),
            None,
            None,
        )


class Strategy(nn.Module, ABC):
    """Base class of every task-balancing strategy.

    Subclasses implement :meth:`combine`. Gradient strategies set :attr:`uses_gradients`; their
    ``combine`` receives the ``[K, P]`` stack of per-task gradients and its Gram matrix.

    Args:
        num_tasks: ``K``.
        refresh_every: recompute gradient-based coefficients every this many steps, reusing
            them in between (needs a model with ``task_grad_scale`` for the reuse steps).
        check_finite: what a non-finite loss does: ``"step"`` (or ``True``): raise
            :class:`ValueError` in :meth:`backward` (reads one bool from the device each step);
            ``"deferred"``: record it on the device, without a host read, and raise at the next
            :meth:`raise_if_nonfinite` (naming the first bad step and its losses; the steps in
            between have already updated the parameters, so restore a checkpoint from before
            that step; the record is not part of ``state_dict``); ``"off"`` (or
            ``False``): no check; ``"auto"`` (default): ``"step"`` for CPU losses, ``"deferred"``
            on accelerators.
        embedding_grad: ``"combined"`` (default): embeddings get ``sum_i c_i grad L_i`` through
            ``task_grad_scale``, at the cost of ``K`` per-task gradient calls + one backward.
            ``"plain"`` (Gram strategies): on refresh steps only ``K - 1`` per-task calls; the one
            plain backward of ``sum_i L_i`` gives every other parameter its plain gradient (so
            embeddings get the plain sum), task ``K``'s shared gradient is the sum minus the
            others, and the shared gradient ``sum_i c_i g_i`` is written directly. Between
            refreshes the cached ``c`` goes through ``task_grad_scale`` as usual.

    Typical use with a :class:`~mtl.models.base.MultiTaskModel` (or :func:`mtl.strategies.model_backward`)::

        scale = strategy.task_grad_scale(device)
        losses = loss_fn(model(batch, task_grad_scale=scale), labels)   # [K]
        strategy.backward(losses, shared_parameters=model.shared_parameters(), task_grad_scale=scale)
        optimizer.step()
    """

    uses_gradients: ClassVar[bool] = False
    #: Gram-matrix strategies: loss weights are ones and the combination depends on the Gram
    #: matrix (and state) only; these support ``embedding_grad="plain"``
    gram_only: ClassVar[bool] = False
    #: gradient strategies whose coefficients may come from gradients w.r.t. a shared
    #: representation instead of parameters (MGDA-UB)
    uses_representation: ClassVar[bool] = False
    #: the strategy's state is driven by the losses it is given (DWA, FAMO, GradNorm, DB-MTL):
    #: under data parallelism they must be the all-reduced losses (``stat_reducer``)
    loss_driven_state: ClassVar[bool] = False
    #: the paper re-evaluates the losses on the same batch after the optimizer step and feeds
    #: them to :meth:`update` (FAMO); trainers do so when this is set
    post_step_losses: ClassVar[bool] = False
    #: strategies defined on the last shared layer (GradNorm's ``W``):
    #: :func:`mtl.strategies.model_backward` then defaults ``shared_parameters`` to
    #: ``model.last_shared_parameters()``
    uses_last_shared_layer: ClassVar[bool] = False

    def __init__(
        self,
        num_tasks: int,
        refresh_every: int = 1,
        check_finite: bool | str = "auto",
        embedding_grad: str = "combined",
    ) -> None:
        super().__init__()
        if embedding_grad not in ("combined", "plain"):
            raise ValueError(f"embedding_grad must be 'combined' or 'plain', got {embedding_grad!r}")
        if embedding_grad == "plain" and not self.gram_only:
            raise ValueError(f"{type(self).__name__}: embedding_grad='plain' needs a Gram-matrix strategy")
        self.embedding_grad = embedding_grad
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
        self.num_tasks = num_tasks
        self.refresh_every = refresh_every
        modes = {True: "step", False: "off", "step": "step", "off": "off", "deferred": "deferred", "auto": "auto"}
        if not isinstance(check_finite, (bool, str)) or check_finite not in modes:
            raise ValueError(f"check_finite must be one of {sorted(map(str, modes))}, got {check_finite!r}")
        self.check_finite: str = modes[check_finite]
        # deferred finite-loss check: device tensors, written without host reads
        self._nonfinite_flag: Tensor | None = None
        self._nonfinite_losses: Tensor | None = None
        self._nonfinite_step: Tensor | None = None
        self.step_count = 0
        self._cached: Combination | None = None
        self._pending_scale: Tensor | None = None
        #: ``[K, P] -> [K, P]``, e.g. an all-reduce (mean) of the task-gradient stack (ordering 2)
        self.grad_reducer: Callable[[Tensor], Tensor] | None = None
        #: ``[K, K] -> [K, K]`` applied to the Gram matrix (e.g. all-reducing the local Gram
        #: matrices: ``K^2`` numbers, but their mean is not the global Gram matrix)
        self.gram_reducer: Callable[[Tensor], Tensor] | None = None
        #: ``[K] -> [K]``, e.g. an all-reduce (mean) of the detached losses that drive state
        self.stat_reducer: Callable[[Tensor], Tensor] | None = None

    # ------------------------------------------------------------------ subclass API
    def _combine_stack(self, losses: Tensor, stats: Tensor, grads: Tensor) -> tuple[Tensor, Combination]:
        """Reduce the ``[K, P]`` stack (ordering 2) and/or its Gram matrix, then combine."""
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        gram = grads @ grads.t()
        if self.gram_reducer is not None:
            gram = self.gram_reducer(gram)
        return grads, self.combine(losses, stats, grads, gram)

    @abstractmethod
    def combine(self, losses: Tensor, stats: Tensor, grads: Tensor | None, gram: Tensor | None) -> Combination:
        """The combination for this step.

        Args:
            losses: ``[K]`` the local losses (with graph).
            stats: ``[K]`` detached losses for state updates (all-reduced if so configured).
            grads: ``[K, P]`` per-task gradients of the shared parameters (gradient strategies
                on refresh steps), else ``None``.
            gram: ``grads @ grads.T`` ``[K, K]`` or ``None``.
        """

    def reuse(self, cached: Combination, losses: Tensor, stats: Tensor) -> Combination:
        """The combination on a step between refreshes (default: the cached coefficients)."""
        return cached

    def finite_check_mode(self, device: torch.device) -> str:
        """``check_finite`` resolved for losses on ``device``: ``"step"``, ``"deferred"`` or ``"off"``."""
        if self.check_finite == "auto":
            return "step" if device.type == "cpu" else "deferred"
        return self.check_finite

    def raise_if_nonfinite(self) -> None:
        """Raise the :class:`ValueError` of a non-finite loss recorded by the deferred check
        (one host read); no-op if none was recorded or the check is not deferred."""
        if self._nonfinite_flag is None or not bool(self._nonfinite_flag):
            return
        assert self._nonfinite_losses is not None and self._nonfinite_step is not None
        self._raise_nonfinite(self._nonfinite_losses, int(self._nonfinite_step))

    def nonfinite_record(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The deferred check's device record ``(flag, first bad step, its losses)`` without a
        host read (``None`` before any deferred check), e.g. to gather it across ranks."""
        if self._nonfinite_flag is None:
            return None
        assert self._nonfinite_step is not None and self._nonfinite_losses is not None
        return self._nonfinite_flag, self._nonfinite_step, self._nonfinite_losses

    def _raise_nonfinite(self, losses: Tensor, step: int) -> None:
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        raise NonFiniteLossError(
            f"{type(self).__name__}: non-finite loss for task(s) {bad} at step {step}: {losses.tolist()}",
            tasks=bad, step=step, losses=losses.tolist(),
        )

    def _record_nonfinite(self, losses: Tensor) -> None:
        bad = ~torch.isfinite(losses).all()
        if self._nonfinite_flag is None:
            self._nonfinite_flag = torch.zeros((), dtype=torch.bool, device=losses.device)
            self._nonfinite_losses = torch.zeros_like(losses)
            self._nonfinite_step = torch.zeros((), dtype=torch.long, device=losses.device)
        first = bad & ~self._nonfinite_flag  # keep the first bad step's losses
        self._nonfinite_losses = torch.where(first, losses, self._nonfinite_losses)
        self._nonfinite_step = torch.where(first, self.step_count, self._nonfinite_step)
        self._nonfinite_flag = self._nonfinite_flag | bad

    def end_epoch(self) -> None:
        """Called by trainers at the end of each epoch (DWA uses it); no-op by default."""

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Plain tensors and ints only, so ``torch.load(..., weights_only=True)`` reads it."""
        cached = None
        if self._cached is not None:
            cached = {"loss_weights": self._cached.loss_weights, "grad_scale": self._cached.grad_scale}
        return {"step_count": self.step_count, "cached": cached}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        cached = state["cached"]
        self._cached = None if cached is None else Combination(cached["loss_weights"], cached["grad_scale"])

    # ------------------------------------------------------------------ driver
    def is_refresh_step(self) -> bool:
        return self._cached is None or self.step_count % self.refresh_every == 0

    def task_grad_scale(self, device: torch.device | str | None = None) -> Tensor | None:
        """The ``task_grad_scale`` tensor to pass to the model's forward for this step.

        On a refresh step it is a ones tensor (per-task gradients are taken at scale 1) that
        :meth:`backward` fills with the coefficients before the final backward; between
        refreshes it holds the cached coefficients. ``None`` for loss-weighting strategies.
        """
        if not self.uses_gradients:
            self._pending_scale = None
            return None
        if self.is_refresh_step() or self._cached is None or self._cached.grad_scale is None:
            self._pending_scale = torch.ones(self.num_tasks, device=device)
        else:
            self._pending_scale = self._cached.grad_scale.to(device=device, dtype=torch.float32).clone()
        return self._pending_scale

    def backward(
        self,
        losses: Tensor,
        shared_parameters: Iterable[nn.Parameter] | None = None,
        task_specific_parameters: Iterable[nn.Parameter] | None = None,
        task_grad_scale: Tensor | None = None,
        state_losses: Tensor | None = None,
        representation: Tensor | None = None,
        non_shared_parameters: Sequence[nn.Parameter] | None = None,
        task_gradients_fn: Callable[[Tensor, list[nn.Parameter], list[int]], Tensor] | None = None,
    ) -> Combination:
        """Combine the task losses and run the one backward pass (gradients accumulate into
        ``.grad`` like ``loss.backward()``).

        Args:
            losses: ``[K]`` per-task losses.
            shared_parameters: the dense shared parameters (required by gradient strategies).
            task_specific_parameters: accepted for API compatibility with the Nash-MTL/FAMO
                reference code; towers get their own task's gradient in every mode.
            task_grad_scale: the tensor returned by :meth:`task_grad_scale` and passed to the
                model's forward, or ``None`` when the model has no such support (then the shared
                gradient is written directly and other parameters get the plain weighted sum).
            state_losses: detached ``[K]`` losses (e.g. all-reduced) that drive state; default
                ``stat_reducer(losses.detach())``.
            representation: for :attr:`uses_representation` strategies (MGDA-UB): a shared
                representation tensor in the graph; task gradients are taken w.r.t. it.
            non_shared_parameters: all parameters except the shared ones; if given (with a
                ``task_grad_scale`` model) the final backward skips the shared parameters and
                their gradient ``sum_i c_i g_i`` is formed from the stack (saves the shared
                weight-gradient products).
            task_gradients_fn: ``(losses, shared_parameters, tasks) -> [len(tasks), P]``
                replacing :func:`task_gradients` (one ``torch.autograd.grad`` call per task),
                e.g. a model's batched per-task backward (``shared_task_gradients`` if the model
                has it); it must return the same rows (flattened per-task gradients in parameter
                order) and keep the graph for the final backward.

        Returns:
            the :class:`Combination` used (detached tensors; no host read).
        """
        self._check_losses(losses)
        stats = self._state_stats(losses, state_losses)
        shared = list(shared_parameters) if shared_parameters is not None else None
        if task_grad_scale is not None and task_grad_scale is not self._pending_scale:
            raise ValueError("task_grad_scale must be the tensor returned by strategy.task_grad_scale() for this step")

        refresh = self.is_refresh_step()
        if self.uses_gradients and not refresh and task_grad_scale is None:
            refresh = True  # reuse needs the model's task_grad_scale; without it, recompute
        if refresh and self.embedding_grad == "plain" and not (self.uses_representation and representation is not None):
            return self._backward_plain_embeddings(losses, stats, self._require_shared(shared), task_grad_scale,
                                                   task_gradients_fn)
        grads, comb = self._step_combination(losses, stats, refresh, shared, task_grad_scale, representation,
                                             task_gradients_fn)

        total = (comb.loss_weights * losses).sum()
        if comb.extra_loss is not None:
            total = total + comb.extra_loss
        direct = self._direct_shared_grad(comb, grads, task_grad_scale, non_shared_parameters)
        self._set_task_grad_scale(task_grad_scale, comb.grad_scale)
        self._final_backward(total, direct, shared, task_grad_scale, non_shared_parameters)
        self.step_count += 1
        return replace(
            comb,
            loss_weights=comb.loss_weights.detach(),
            grad_scale=None if comb.grad_scale is None else comb.grad_scale.detach(),
            extra_loss=None,
        )

    # ------------------------------------------------------------------ backward phases
    def _check_losses(self, losses: Tensor) -> None:
        """Shape check, then the finite-loss check of :attr:`check_finite` (raise or record)."""
        k = self.num_tasks
        if losses.dim() != 1 or losses.shape[0] != k:
            raise ValueError(f"{type(self).__name__}: expected losses of shape [{k}], got {tuple(losses.shape)}")
        mode = self.finite_check_mode(losses.device)
        if mode == "step" and not bool(torch.isfinite(losses.detach()).all()):
            self._raise_nonfinite(losses.detach(), self.step_count)
        elif mode == "deferred":
            self._record_nonfinite(losses.detach())

    def _state_stats(self, losses: Tensor, state_losses: Tensor | None) -> Tensor:
        """The detached ``[K]`` losses that drive state: ``state_losses`` as given, else the
        local losses through :attr:`stat_reducer`."""
        if state_losses is not None:
            return state_losses.detach()
        stats = losses.detach()
        return stats if self.stat_reducer is None else self.stat_reducer(stats)

    def _require_shared(self, shared: list[nn.Parameter] | None, why: str = "") -> list[nn.Parameter]:
        """``shared`` if non-empty, else the error naming the missing ``shared_parameters=``."""
        if not shared:
            raise ValueError(f"{type(self).__name__} needs shared_parameters= "
                             f"{why or '(the dense shared parameters)'}")
        return shared

    def _step_combination(
        self,
        losses: Tensor,
        stats: Tensor,
        refresh: bool,
        shared: list[nn.Parameter] | None,
        task_grad_scale: Tensor | None,
        representation: Tensor | None,
        task_gradients_fn: Callable[[Tensor, list[nn.Parameter], list[int]], Tensor] | None,
    ) -> tuple[Tensor | None, Combination]:
        """This step's combination and the ``[K, P]`` task-gradient stack it came from (``None``
        when no stack of shared-parameter gradients was taken); caches the combination."""
        if not self.uses_gradients:
            comb = self.combine(losses, stats, None, None)
            self._cached = comb.detached()
            return None, comb
        if not refresh:
            assert self._cached is not None
            return None, self.reuse(self._cached, losses, stats)
        use_representation = self.uses_representation and representation is not None
        if use_representation:
            if task_grad_scale is None:
                raise ValueError(f"{type(self).__name__}: representation gradients need a model called with task_grad_scale")
            grads = task_gradients(losses, [representation])
        else:
            grads = self._shared_task_gradients(losses, self._require_shared(shared), task_gradients_fn)
        grads, comb = self._combine_stack(losses, stats, grads)
        self._cached = comb.detached()
        # representation grads cannot be written to parameters
        return (None if use_representation else grads), comb

    def _shared_task_gradients(
        self,
        losses: Tensor,
        shared: list[nn.Parameter],
        task_gradients_fn: Callable[[Tensor, list[nn.Parameter], list[int]], Tensor] | None,
        tasks: list[int] | None = None,
    ) -> Tensor:
        """The ``[len(tasks), P]`` per-task gradients of ``shared`` (all tasks by default),
        shape-checked."""
        tasks = list(range(self.num_tasks)) if tasks is None else tasks
        grads = (task_gradients_fn or task_gradients)(losses, shared, tasks)
        expected = (len(tasks), sum(p.numel() for p in shared))
        if tuple(grads.shape) != expected:
            raise ValueError(f"task gradients have shape {tuple(grads.shape)}, expected {expected}")
        return grads

    def _direct_shared_grad(
        self,
        comb: Combination,
        grads: Tensor | None,
        task_grad_scale: Tensor | None,
        non_shared_parameters: Sequence[nn.Parameter] | None,
    ) -> Tensor | None:
        """The flat shared gradient to write directly, or ``None`` when the one backward forms it
        (through the model's ``task_grad_scale``, or the plain weighted sum)."""
        if comb.shared_grad is not None or comb.grad_scale is None:
            return comb.shared_grad
        if task_grad_scale is None and grads is None:
            raise ValueError(f"{type(self).__name__}: no task gradients to combine")
        if grads is not None and (task_grad_scale is None or non_shared_parameters is not None):
            return (comb.grad_scale * comb.loss_weights).to(grads.dtype) @ grads
        return None

    def _set_task_grad_scale(self, task_grad_scale: Tensor | None, grad_scale: Tensor | None) -> None:
        """Fill the model's ``task_grad_scale`` (read by the saved graph) with this step's
        coefficients (ones without any), and end the step's pending scale."""
        if task_grad_scale is not None:
            if grad_scale is not None:
                task_grad_scale.data.copy_(grad_scale.detach())
            else:
                task_grad_scale.data.fill_(1.0)
        self._pending_scale = None

    def _final_backward(
        self,
        total: Tensor,
        direct: Tensor | None,
        shared: list[nn.Parameter] | None,
        task_grad_scale: Tensor | None,
        non_shared_parameters: Sequence[nn.Parameter] | None,
    ) -> None:
        """The one backward of ``total``; with a ``direct`` shared gradient, the shared
        parameters keep their previous ``.grad`` through it and then get ``direct`` added."""
        if direct is None:
            total.backward()
            return
        shared = self._require_shared(shared, "to write the combined gradient")
        if non_shared_parameters is not None and task_grad_scale is not None:
            inputs = [p for p in non_shared_parameters if p.requires_grad]
            if inputs:
                torch.autograd.backward(total, inputs=inputs)
        else:
            with _grads_set_aside(shared):
                total.backward()
        write_flat_grad(shared, direct)

    def _backward_plain_embeddings(
        self,
        losses: Tensor,
        stats: Tensor,
        shared: list[nn.Parameter],
        task_grad_scale: Tensor | None,
        task_gradients_fn: Callable[[Tensor, list[nn.Parameter], list[int]], Tensor] | None,
    ) -> Combination:
        """``embedding_grad="plain"`` on a refresh step (see the class docstring)."""
        k = self.num_tasks
        p_total = sum(p.numel() for p in shared)
        grads = losses.new_zeros(k, p_total, dtype=shared[0].dtype)
        if k > 1:
            grads[: k - 1] = self._shared_task_gradients(losses, shared, task_gradients_fn, list(range(k - 1)))
        self._set_task_grad_scale(task_grad_scale, None)
        with _grads_set_aside(shared):
            losses.sum().backward()
            total = torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None
                               else p.grad.reshape(-1) for p in shared])
        grads[k - 1] = total - grads[: k - 1].sum(0)
        grads, comb = self._combine_stack(losses, stats, grads)
        assert comb.grad_scale is not None and comb.shared_grad is None
        self._cached = comb.detached()
        write_flat_grad(shared, (comb.grad_scale * comb.loss_weights).to(grads.dtype) @ grads)
        self.step_count += 1
        return comb.detached()


# ---------------------------------------------------------------------- helpers


@contextmanager
def _grads_set_aside(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Run the block with ``params``' ``.grad`` set to ``None``, then put the previous ``.grad``
    back (whatever the block accumulated into them is dropped)."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


class SeededStrategy(Strategy):
    """A strategy that draws task orders from its own seeded ``torch.Generator``; the generator's
    state is part of the strategy's state, so every data-parallel rank draws the same orders."""

    def __init__(self, num_tasks: int, seed: int = 0, **kw: Any) -> None:
        super().__init__(num_tasks, **kw)
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "rng": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["rng"])


def task_gradients(losses: Tensor, params: Sequence[Tensor], tasks: Sequence[int] | None = None) -> Tensor:
    """``[T, P]``: row ``r`` is the flattened gradient of ``losses[tasks[r]]`` (default: every
    task) w.r.t. ``params`` (zeros where a parameter is not reached); the graph is retained."""
    tasks = list(range(losses.shape[0])) if tasks is None else list(tasks)
    sizes = [p.numel() for p in params]
    out = losses.new_zeros(len(tasks), sum(sizes), dtype=params[0].dtype)
    for row, i in enumerate(tasks):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        offset = 0
        for g, n in zip(gs, sizes):
            if g is not None:
                out[row, offset : offset + n] = g.reshape(-1)
            offset += n
    return out


def write_flat_grad(params: Sequence[nn.Parameter], flat: Tensor) -> None:
    """Accumulate a flat gradient into ``params``' ``.grad`` (like ``backward``)."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} entries, parameters have {offset}")


def active_tasks(gram: Tensor, rel_eps: float = 1e-12) -> Tensor:
    """Boolean ``[K]``: tasks whose gradient is not (numerically) zero."""
    diag = gram.diagonal()
    return diag > rel_eps * diag.max().clamp_min(torch.finfo(diag.dtype).tiny) + torch.finfo(diag.dtype).tiny


def normalized_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(gram64 / s, s)`` with ``s`` the largest diagonal entry (1 if all are zero), in float64."""
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.t())
    s = g.diagonal().max()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return g / s, s


def psqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` as ``x * rsqrt(x)``: on CPU ``torch.sqrt`` (and ``pow(0.5)``)
    of small float64 tensors was seen to go through a multi-threaded vector-math path whose
    thread wake-up cost milliseconds on a loaded 2-core machine; ``rsqrt`` did not."""
    return x * x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt()
