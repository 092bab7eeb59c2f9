"""The project's default optimizer set-up: Adam, lazily row-sparse on embedding tables.

:func:`build_optimizer` returns one :class:`torch.optim.Optimizer` (:class:`MixedAdam`) with two
kinds of parameter groups:

- ``row_sparse=True`` (embedding tables): row-wise lazy Adam. Only the rows present in the
  gradient (a sparse COO gradient, as produced by ``InputModule(spec, sparse_gradients=True)``)
  are updated, with exactly the update of :class:`torch.optim.SparseAdam`:
  ``m_r <- b1 m_r + (1-b1) g_r``, ``v_r <- b2 v_r + (1-b2) g_r^2``,
  ``p_r <- p_r - lr * sqrt(1-b2^t) / (1-b1^t) * m_r / (sqrt(v_r) + eps)``, with one step
  counter ``t`` per table (incremented on every step the table has a gradient). Rows not in
  the batch keep their parameters and moments unchanged. A dense gradient on such a group
  updates every row with the same formula. A group ``weight_decay`` ``wd`` adds ``wd * p_r`` to
  the gradient of the touched rows only (``g_r`` above), so a row is regularised each time it
  occurs: frequent ids more, rare ids less, a lazy counterpart of L2 (the "mini-batch aware"
  regularisation of Zhou et al., "Deep Interest Network", KDD 2018, sec. 5.1, without its
  ``1/n_j`` factor).
- ``row_sparse=False`` (all other parameters): :func:`torch.optim.adam.adam` (``fused=True``
  where the device supports it, otherwise ``foreach``), i.e. the maths of
  :class:`torch.optim.Adam` including its optional L2 ``weight_decay``.

Being a real ``Optimizer``, it works with ``state_dict``/``load_state_dict``, ``zero_grad`` and
``torch.optim.lr_scheduler``.

Example:
    >>> from mtl.features import FeatureSpec, SparseFeature
    >>> from mtl.models import build_model
    >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100, 4)], tasks=["a", "b"])
    >>> model = build_model("mmoe", spec, sparse_gradients=True)
    >>> opt = build_optimizer(model, lr=1e-3)
    >>> loss = model({"u": torch.tensor([1, 2, 2])}).sum()
    >>> loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.adam import adam as _functional_adam


class MixedAdam(torch.optim.Optimizer):
    """Adam with row-sparse (lazy) groups for embedding tables and fused dense groups.

    Args:
        params: parameters or parameter groups; a group dict may set ``row_sparse`` (default
            ``False``) and any of the hyper-parameters below.
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: the epsilon added to the denominator.
        weight_decay: L2 penalty added to the gradient (as in ``torch.optim.Adam``); in
            row-sparse groups to the touched rows' gradient only (untouched rows stay as they are).
        fused: use the fused dense kernel; ``None`` = use it when all dense parameters are on a
            device that supports it (CPU and CUDA float tensors), else ``foreach``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, row_sparse=False, fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["row_sparse"]:
                self._step_row_sparse(group)
            else:
                self._step_dense(group)
        return loss

    def _step_dense(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "MixedAdam: a dense group got a sparse gradient; put embedding tables in a "
                    "row_sparse group (build_optimizer does this)"
                )
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        fused = group["fused"]
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        beta1, beta2 = group["betas"]
        _functional_adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else True,
            fused=bool(fused),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _step_row_sparse(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        # Row-sparse gradients are batched over tables (foreach maths on the gathered rows).
        tables: list[tuple[Tensor, dict[str, Any], Tensor, Tensor, float]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            rows: Tensor | None = None
            if grad.is_sparse:
                if grad.sparse_dim() != 1:
                    raise ValueError(
                        f"MixedAdam: row_sparse parameter of shape {list(p.shape)} got a sparse gradient with "
                        f"sparse_dim={grad.sparse_dim()}; expected row-sparse (sparse_dim=1, as nn.Embedding makes)"
                    )
                rows = grad._indices()[0]
                # Autograd's gradient accumulation drops the coalesced flag; rows that are
                # strictly increasing are unique, so no sort is needed then.
                if not (grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all())):
                    grad = grad.coalesce()
                    rows = grad._indices()[0]
                values = grad._values()
                if values.numel() == 0:
                    continue
                if group["weight_decay"]:
                    values = values + group["weight_decay"] * F.embedding(rows, p.detach())
            else:
                values = grad if not group["weight_decay"] else grad + group["weight_decay"] * p.detach()
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
            if rows is None:
                _dense_rows_update(p, state["exp_avg"], state["exp_avg_sq"], values, beta1, beta2, eps, step_size)
            else:
                tables.append((p, state, rows, values, step_size))
        if tables:
            _row_adam_update(tables, beta1, beta2, eps)


def _dense_rows_update(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float, eps: float,
    step_size: float,
) -> None:
    """SparseAdam's update with every row present (a dense gradient on a row-sparse group)."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)


def _row_adam_update(
    tables: list[tuple[Tensor, dict[str, Any], Tensor, Tensor, float]], beta1: float, beta2: float, eps: float
) -> None:
    """SparseAdam's update of the given (distinct) rows of several tables at once.

    Each entry: ``(param, state, rows [n], grad rows [n, dim], step_size)``.
    """
    # Gathers by F.embedding: on 2 CPU threads index_select was seen to stall (ms) where the
    # embedding kernel takes microseconds.
    ms = [F.embedding(rows, state["exp_avg"]) for _, state, rows, _, _ in tables]
    vs = [F.embedding(rows, state["exp_avg_sq"]) for _, state, rows, _, _ in tables]
    gs = [values for _, _, _, values, _ in tables]
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    for (_, state, rows, _, _), m, v in zip(tables, ms, vs):
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
    torch._foreach_sqrt_(vs)
    torch._foreach_add_(vs, eps)
    torch._foreach_div_(ms, vs)
    # Rows are distinct: gather, add, write back (index_add_ was ~4x slower here on CPU).
    ps = [F.embedding(rows, param) for param, _, rows, _, _ in tables]
    for p_rows, update, (_, _, _, _, step_size) in zip(ps, ms, tables):
        p_rows.add_(update, alpha=-step_size)
    for (param, _, rows, _, _), p_rows in zip(tables, ps):
        param.index_copy_(0, rows, p_rows)


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
    embedding_weight_decay: float = 0.0,
    fused: bool | None = None,
) -> MixedAdam:
    """The default optimizer of a model: row-sparse lazy Adam on its embedding tables, Adam
    (fused where possible) on everything else.

    Args:
        model: a :class:`mtl.models.base.MultiTaskModel` (or any module with
            ``embedding_parameters()``; without it, every parameter is dense). Build the model
            with ``sparse_gradients=True`` for the row-sparse update to skip untouched rows.
        lr: learning rate of the dense parameters (and of the tables unless ``embedding_lr``).
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: L2 penalty on the dense parameters only.
        embedding_lr: learning rate of the embedding tables (default ``lr``).
        embedding_weight_decay: L2 on the embedding group, applied to the rows a batch touches
            (see the module docstring).
        fused: see :class:`MixedAdam`.

    Returns:
        A :class:`MixedAdam` with group 0 = embedding tables (``row_sparse=True``, omitted if the
        model has none) and group 1 = the other trainable parameters.
    """
    embedding_params: list[nn.Parameter] = []
    if hasattr(model, "embedding_parameters"):
        embedding_params = [p for p in model.embedding_parameters() if p.requires_grad]
    emb_ids = {id(p) for p in embedding_params}
    dense_params = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    groups: list[dict[str, Any]] = []
    if embedding_params:
        groups.append(
            {"params": embedding_params, "row_sparse": True, "lr": lr if embedding_lr is None else embedding_lr,
             "weight_decay": embedding_weight_decay}
        )
    if dense_params:
        groups.append({"params": dense_params, "row_sparse": False})
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return MixedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


__all__ = ["MixedAdam", "build_optimizer"]
