"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge

from mtl.device import host_to_device
from mtl.features import FeatureSpec
from mtl.models.base import Batch, MultiTaskModel
from mtl.models.cross import expert_block
from mtl.models.layers import BatchedMLP, mix_experts, shared_input_linear, stacked_owners
from mtl.precision import Precision


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        num_experts: E shared experts.
        expert_hidden: expert MLP widths (ReLU after each); the last is the expert output width.
        tower_hidden: tower MLP widths before the final logit.
        sparse_gradients: row-sparse embedding gradients.
        expert_type: ``"mlp"`` or ``"cross"`` (DCN-v2 cross layers then the ``expert_hidden``
            MLP, :class:`~mtl.models.cross.BatchedCrossNet`; runs the per-module body, not the
            fused kernel, and has no batched ``shared_task_gradients``).
        cross: cross expert options (``layers``, ``rank``, ``mixtures``).
        gate_temperature: the gates are ``softmax(logits / T)``; ``T > 1`` flattens them.
        dropout: dropout after each hidden layer of the experts and towers in training mode
            (:class:`~mtl.models.layers.BatchedMLP`); a training forward then runs the
            per-module body (:meth:`forward_modules`), evaluation the fused kernel. 0 = off.
        load_balance: weight ``lambda`` of the load-balancing penalty
            ``lambda * mean_k (E * sum_e u_ke^2 - 1)``, ``u_ke`` = task ``k``'s mean gate weight on
            expert ``e`` over the training batch (0 when every expert gets ``1/E`` of each task's
            weight; :meth:`regularization`, added to the training loss; its gradient reaches the
            gate layer only).
        compute_dtype: precision of the body (:mod:`mtl.precision`; ``None`` = the parameters'
            dtype). ``"bfloat16"`` runs the experts, gates and towers in bfloat16 (about 2x faster
            GEMMs on CPUs with AVX512-BF16/AMX) while parameters, gradients, the optimizer and
            the logits stay float32 (mixed precision: a copy of the weights is cast each step and
            gradients are cast back); results differ from float32 at bfloat16 precision (~3
            significant digits). ``"auto"``: bfloat16 where the device has it natively.

    Example:
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
        >>> MMoE(spec, num_experts=3)({"u": torch.tensor([1, 2])}).shape
        torch.Size([2, 2])
    """

    casts_itself = True  # the fused body casts to the compute dtype (forward_modules: autocast)
    shared_task_gradient_options = frozenset({"separable", "parameters"})

    def __init__(
        self,
        spec: FeatureSpec,
        num_experts: int = 4,
        expert_hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
        expert_type: str = "mlp",
        cross: dict[str, Any] | None = None,
        gate_temperature: float = 1.0,
        load_balance: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        expert_hidden = expert_hidden or [128, 64]
        tower_hidden = tower_hidden if tower_hidden is not None else [32]
        if not gate_temperature > 0 or load_balance < 0:
            raise ValueError(f"mmoe: need gate_temperature > 0 and load_balance >= 0, got {gate_temperature}, {load_balance}")
        d, k = self.inputs.output_dim, self.num_tasks
        self.num_experts = num_experts
        self.gate_temperature, self.load_balance = float(gate_temperature), float(load_balance)
        self.experts = expert_block(expert_type, num_experts, d, expert_hidden, shared_input=True, cross=cross,
                                    dropout=dropout)
        self.fused = expert_type == "mlp"
        self.dropout = float(dropout)
        if not self.fused or self.dropout:
            # the batched per-task expert gradients are the fused MLP kernel's: the strategy
            # driver takes per-task gradients by autograd instead
            self.shared_task_gradients = None  # type: ignore[assignment]
            self.shared_task_gradient_options = None
        self._balance_gates: Tensor | None = None
        # All K gates as one Linear(d, K*E); rows k*E:(k+1)*E belong to task k.
        self.gates = nn.Linear(d, k * num_experts)
        self.towers = BatchedMLP(k, expert_hidden[-1], tower_hidden, out_dim=1, shared_input=False, dropout=dropout)
        self._workspace = Workspace()
        self._last_forward = _ForwardRecord()

    def routing_weights(self, batch: Batch) -> dict[str, Tensor]:
        return {"gate": self.gate_weights(self.inputs(batch))}

    def gate_weights(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        """Per-task distributions over experts, ``[B, K, E]``."""
        logits = shared_input_linear(x, self.gates.weight, self.gates.bias, task_grad_scale)
        logits = logits.view(x.shape[0], self.num_tasks, self.num_experts)
        return torch.softmax(logits / self.gate_temperature if self.gate_temperature != 1.0 else logits, dim=-1)

    def regularization(self) -> Tensor:
        """The load-balancing penalty of the last training forward (see ``load_balance``)."""
        gates, self._balance_gates = self._balance_gates, None
        if gates is None:
            return super().regularization()
        usage = gates.float().mean(0)  # [K, E]
        return self.load_balance * (self.num_experts * usage.pow(2).sum(-1) - 1.0).mean()

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.inputs.output_dim:
            raise ValueError(f"MMoE: expected input [B, {self.inputs.output_dim}], got {list(x.shape)}")
        if task_grad_scale is not None and task_grad_scale.shape != (self.num_tasks,):
            raise ValueError(f"task_grad_scale must have shape [{self.num_tasks}], got {list(task_grad_scale.shape)}")
        if self.load_balance > 0 and self.training and torch.is_grad_enabled():
            # the gates once more outside the fused kernel (one small GEMM): the penalty's graph.
            # The input is detached: the training step backpropagates the penalty after the task
            # losses' backward has freed the input's graph, so the penalty trains the gates only.
            self._balance_gates = self.gate_weights(x.detach())
        if not self.fused or (self.dropout and self.training):  # the fused kernel has no dropout
            return self.forward_modules(x, task_grad_scale)
        gate_w, gate_b = self.gates.weight, self.gates.bias
        if self.gate_temperature != 1.0:  # softmax(z / T): the gate layer scaled by 1 / T
            gate_w, gate_b = gate_w / self.gate_temperature, gate_b / self.gate_temperature
        params = [*self.experts.weights, *self.experts.biases, gate_w, gate_b]
        params += [*self.towers.weights, *self.towers.biases]
        out_dtype = x.dtype
        dtype = self.body_dtype(x)
        if dtype != x.dtype:
            # differentiable casts: gradients come back to the float32 parameters and input
            x = x.to(dtype)
            params = [p.to(dtype) for p in params]
        # the live tensor (no cast here): strategies fill it after this forward, and the backward
        # must see the values they fill; it is cast to the body's dtype where the backward reads it
        scale = None if task_grad_scale is None else task_grad_scale.detach()
        ws = self._workspace if torch.is_grad_enabled() else None
        logits = _MMoEFunction.apply(x, scale, len(self.experts.weights), len(self.towers.weights), ws, *params)
        self._last_forward.set(logits.grad_fn)
        return logits.to(out_dtype)

    def shared_task_gradients(
        self,
        losses: Tensor,
        tasks: Sequence[int] | None = None,
        parameters: Sequence[Tensor] | None = None,
        separable: bool = False,
    ) -> Tensor:
        """Per-task gradients of the experts (:meth:`shared_parameters`) in one batched backward.

        Row ``r`` is the gradient of ``losses[tasks[r]]`` w.r.t. :meth:`shared_parameters`,
        flattened and concatenated in that order, through this model's last forward pass (with
        gradients enabled): the same numbers as ``torch.autograd.grad(losses[t],
        model.shared_parameters(), retain_graph=True)`` for each ``t`` (a ``task_grad_scale``
        passed to that forward scales task ``i``'s branch as in the ordinary backward), up to
        floating-point summation order. The graph is kept and no ``.grad`` is touched, so the
        usual backward can follow; :func:`mtl.strategies.model_backward` uses this method for
        gradient strategies.

        Cost: instead of ``len(tasks)`` backward passes through the whole body, the losses'
        gradients w.r.t. the logits (through the loss only), one backward through the towers
        with unit upstream gradients (shared by all tasks), the gate mixing for every (expert,
        task) pair, then the experts' backward for all requested tasks at once: per layer one
        ``bmm`` over the experts with the tasks side by side in the product's columns, reusing
        the forward's saved activations and ReLU masks, over row chunks that stay in cache.
        No input, gate or tower gradient is formed (measured step costs:
        ``bench/bench_strategies.py``). Any loss is handled (``losses[t]`` may read several
        tasks' logits).

        Args:
            losses: 1-D tensor of losses computed from the logits of this model's last forward;
                they must reach the experts only through those logits (a loss that also reads
                the expert weights directly, or the output of another forward call, is not
                covered).
            tasks: indices into ``losses`` (default: all), in the order of the returned rows.
            parameters: a subset of :meth:`shared_parameters` (default: all of them), in the
                order of the returned columns; only the expert layers from the lowest one
                named upwards are backpropagated (e.g. GradNorm's last shared layer is cheap).
            separable: the caller guarantees that ``losses[t]`` reads only the logits of task
                ``t`` (column ``t``), as per-task BCE does. Then one backward of
                ``losses.sum()`` through the loss gives every task's logit gradient, and each
                (expert, task) gradient is a scaled copy of the task's tower gradient instead of a
                small product over all tasks (cheaper; same numbers). Wrong if a loss mixes tasks.

        Returns:
            ``[len(tasks), P]`` in the parameters' dtype, ``P`` = the parameters' total size.

        Raises:
            RuntimeError: no forward with gradients recorded, or its graph was already freed
                (call this before a ``backward`` without ``retain_graph``).
            ValueError: bad ``losses`` / ``tasks``.
        """
        node = self._last_forward.node()
        if node is None:
            raise RuntimeError(
                "MMoE.shared_task_gradients: no live graph of a forward pass with gradients enabled "
                "(run the forward first, and call this before a backward that frees the graph)"
            )
        if losses.dim() != 1:
            raise ValueError(f"MMoE.shared_task_gradients: losses must be 1-D, got shape {list(losses.shape)}")
        tasks = list(range(losses.shape[0])) if tasks is None else [int(t) for t in tasks]
        bad = [t for t in tasks if not 0 <= t < losses.shape[0]]
        if bad:
            raise ValueError(f"MMoE.shared_task_gradients: task indices {bad} out of range for {losses.shape[0]} losses")
        where = {id(p): ("w", layer) for layer, p in enumerate(self.experts.weights)}
        where.update({id(p): ("b", layer) for layer, p in enumerate(self.experts.biases)})
        params = self.shared_parameters() if parameters is None else list(parameters)
        if not params or any(id(p) not in where for p in params):
            raise ValueError("MMoE.shared_task_gradients: parameters must be a non-empty subset of shared_parameters()")
        out = torch.empty(len(tasks), sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        if not tasks:
            return out
        try:
            sv = _unpack_saved(node)
        except RuntimeError as err:
            raise RuntimeError(
                "MMoE.shared_task_gradients: the last forward's graph was already freed by a backward pass "
                "(call this first, or pass retain_graph=True to that backward)"
            ) from err
        # d losses[t] / d logits for each requested task, through the loss only: [T, B, K]
        # (separable: only the diagonal, d losses[t] / d logits[:, t], as [B, T]).
        edge = GradientEdge(node, 0)
        rows: list[Tensor | None] = []
        if losses.requires_grad:
            if separable:
                rows.append(torch.autograd.grad(losses.sum(), edge, retain_graph=True, allow_unused=True)[0])
            else:
                for t in tasks:
                    rows.append(torch.autograd.grad(losses[t], edge, retain_graph=True, allow_unused=True)[0])
        if all(g is None for g in rows):
            raise RuntimeError(
                "MMoE.shared_task_gradients: the losses do not depend on the logits of this model's last "
                "forward pass (the fused body); compute them from that forward's output"
            )
        task_index = None  # separable: the requested tasks' columns (None = all, in order)
        if separable:
            jac = rows[0]  # [B, K]
            if tasks != list(range(jac.shape[1])):
                task_index = host_to_device(torch.tensor(tasks), jac.device)
                jac = jac.index_select(1, task_index)
            jac = jac.to(sv.x.dtype)  # [B, T]
        else:
            rows = [torch.zeros_like(sv.gates[:, :, 0]) if g is None else g for g in rows]
            jac = torch.stack(rows).to(sv.x.dtype)
        with torch.no_grad():
            lowest = min(where[id(p)][1] for p in params)
            weights, biases = _expert_task_gradients(
                sv, jac, self._workspace, lowest, separable=separable, task_index=task_index
            )
            offset = 0
            for p in params:
                kind, layer = where[id(p)]
                grad = weights[layer] if kind == "w" else biases[layer]
                n = p.numel()
                out[:, offset : offset + n].view(len(tasks), *p.shape).copy_(grad.view(len(tasks), *p.shape))
                offset += n
        return out

    def forward_modules(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        """The same logits as :meth:`forward_representation`, composed from the generic layers
        (:class:`BatchedMLP`, :func:`mix_experts`) under autograd; slower, kept as the readable
        definition and as a check of the fused path."""
        self._last_forward.set(None)  # shared_task_gradients reads the fused body's graph only
        dtype = self.body_dtype(x)
        if dtype != x.dtype:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return self._modules_body(x, task_grad_scale).to(x.dtype)
        return self._modules_body(x, task_grad_scale)

    def _modules_body(self, x: Tensor, task_grad_scale: Tensor | None) -> Tensor:
        experts = self.experts(x)  # [E, B, H]
        mixed = mix_experts(self.gate_weights(x, task_grad_scale), experts, task_grad_scale)  # [K, B, H]
        return self.towers(mixed).squeeze(-1).t()

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The experts' last layer (the gates' mixtures of its output feed the towers)."""
        return self.experts.last_layer()

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        gate_owner = torch.arange(self.num_tasks).repeat_interleave(self.num_experts)
        return [(self.gates.weight, gate_owner), (self.gates.bias, gate_owner)] + stacked_owners(self.towers)


class _ForwardRecord:
    """A weak reference to the fused node of the last forward with gradients, for
    :meth:`MMoE.shared_task_gradients`; never keeps a graph alive, dropped when pickled."""

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType | None = None

    def set(self, node) -> None:
        self._ref = None if node is None else weakref.ref(node)

    def node(self):
        return None if self._ref is None else self._ref()

    def __getstate__(self) -> dict:
        return {"_ref": None}

    def __deepcopy__(self, memo: dict) -> "_ForwardRecord":
        return _ForwardRecord()


def _expert_task_gradients(
    sv: "_FusedSaved",
    jac: Tensor,
    ws: "Workspace | None",
    lowest: int = 0,
    separable: bool = False,
    task_index: Tensor | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The experts' parameter gradients of ``T`` losses for the layers ``lowest..``:
    ``(weights, biases)``, per layer ``[T, E, in, out]`` and ``[T, E, out]`` (strided views of
    scratch buffers: copy them out before the next call), ``None`` below ``lowest``.

    ``jac`` ``[T, B, K]``: loss ``t``'s gradient w.r.t. the logits. Loss ``t``'s gradient
    w.r.t. expert ``e``'s output at row ``b`` is
    ``sum_s gates[b, s, e] * scale[s] * jac[t, b, s] * v[s, b]``, with ``v[s, b]`` = d logit_s /
    d mixture_s at row ``b`` (one backward of the towers with unit upstream gradients); from
    there the experts' backward runs for all ``T`` losses together, the losses side by side,
    over chunks of :data:`_ROW_CHUNK` rows whose weight-gradient products are accumulated.

    ``separable`` (loss ``t`` reads only the logit of task ``task_index[t]``; ``task_index`` on
    the device, ``None`` = all tasks in order): ``jac`` is ``[B, T]``, ``jac[b, t]`` = d loss ``t``
    / d that logit at row ``b``, and the sum over ``s`` above has the one term ``s = task_index[t]``.
    """
    x, gates, hs, ts, ew_rest, tw, scale = sv.x, sv.gates, sv.hs, sv.ts, sv.ew_rest, sv.tw, sv.scale
    b, k, e = gates.shape
    nt = jac.shape[1] if separable else jac.shape[0]
    le, lt = len(hs), len(tw)

    def buf(*shape: int) -> Tensor:
        return ws.take(shape, x) if ws is not None else torch.empty(shape, dtype=x.dtype, device=x.device)

    # v [K, B, H]: d logit_s / d mixture_s (the towers' backward for an upstream gradient of 1).
    v = tw[lt - 1].transpose(1, 2).expand(k, b, tw[lt - 1].shape[1])
    if lt > 1:
        v = _relu_grad_(v, ts[lt - 1], buf(*ts[lt - 1].shape))
    for layer in reversed(range(lt - 1)):
        v = torch.bmm(v, tw[layer].transpose(1, 2), out=buf(k, b, tw[layer].shape[1]))
        if layer > 0:
            _relu_grad_(v, ts[layer])
    h = v.shape[2]
    v_b = v.transpose(0, 1)  # [B, K, H]
    # coef[e, b, t, s] = gates[b, s, e] * scale[s] * jac[t, b, s]: loss t's gradient w.r.t.
    # expert e's output at row b is relu'(expert e at b) * sum_s coef[e, b, t, s] * v[s, b].
    gates_ebs = gates.permute(2, 0, 1) if scale is None else gates.permute(2, 0, 1) * scale.view(1, 1, k)
    if not separable:
        jac_bts = jac.transpose(0, 1)  # [B, T, K]
    elif task_index is None:
        coef_diag = gates_ebs * jac.unsqueeze(0)  # [E, B, K]
    else:
        coef_diag = gates_ebs.index_select(2, task_index) * jac.unsqueeze(0)  # [E, B, T]
        v_b = v_b.index_select(1, task_index)  # [B, T, H]: each requested task's own tower gradient

    fan_ins = [x.shape[1]] + [hs[layer].shape[2] for layer in range(le - 1)]
    widths = [hs[layer].shape[2] for layer in range(le)]
    layers = range(lowest, le)
    # The first layer's input with a column of ones: its product also gives the bias gradient.
    if lowest == 0:
        x1 = buf(b, fan_ins[0] + 1)
        x1[:, : fan_ins[0]] = x
        x1[:, fan_ins[0]] = 1.0
    # Accumulators: weights [E, in, T*H_l] (the losses side by side; the first layer's has the
    # bias gradient as an extra last input row), biases of the other layers [E, T*H_l].
    acc_w: list[Tensor | None] = [None] * le
    acc_b: list[Tensor | None] = [None] * le
    for layer in layers:
        acc_w[layer] = buf(e, fan_ins[layer] + (layer == 0), nt * widths[layer])
        acc_b[layer] = acc_w[0][:, fan_ins[0]] if layer == 0 else buf(e, nt * widths[layer])
    # Rows in chunks, so that each chunk's intermediates stay in cache between the products.
    for r0 in range(0, b, _ROW_CHUNK):
        r1 = min(b, r0 + _ROW_CHUNK)
        c = r1 - r0
        first = r0 == 0
        # The last expert layer's ReLU applied to v per expert, then per (expert, row) one small
        # product [T, K] x [K, H]: d [E, c, T, H], the gradient w.r.t. the last layer's pre-activation.
        kv = v_b.shape[1]  # K (general) or T (separable)
        v_masked = _relu_grad_(v_b[r0:r1].unsqueeze(0).expand(e, c, kv, h), hs[le - 1][:, r0:r1].unsqueeze(2), buf(e, c, kv, h))
        if separable:
            d = v_masked.mul_(coef_diag[:, r0:r1].unsqueeze(3))  # [E, c, T, H]
        else:
            coef = torch.mul(gates_ebs[:, r0:r1].unsqueeze(2), jac_bts[r0:r1].unsqueeze(0), out=buf(e, c, nt, k))
            d = torch.bmm(coef.view(e * c, nt, k), v_masked.view(e * c, k, h), out=buf(e * c, nt, h)).view(e, c, nt, h)
        for layer in reversed(layers):
            width, fan_in = widths[layer], fan_ins[layer]
            d_flat = d.view(e, c, nt * width)
            inp = x1[r0:r1].t().expand(e, fan_in + 1, c) if layer == 0 else hs[layer - 1][:, r0:r1].transpose(1, 2)
            if first:
                torch.bmm(inp, d_flat, out=acc_w[layer])
            else:
                acc_w[layer].baddbmm_(inp, d_flat)
            if layer > 0:
                if first:
                    torch.sum(d_flat, dim=1, out=acc_b[layer])
                else:
                    acc_b[layer].add_(d_flat.sum(1))
            if layer > lowest:
                w_t = ew_rest[layer - 1].transpose(1, 2)  # [E, H_l, H_{l-1}]
                below = torch.bmm(d.view(e, c * nt, width), w_t, out=buf(e, c * nt, fan_in))
                d = _relu_grad_(below.view(e, c, nt, fan_in), hs[layer - 1][:, r0:r1].unsqueeze(2))

    weights: list[Tensor | None] = [None] * le
    biases: list[Tensor | None] = [None] * le
    for layer in layers:
        width, fan_in = widths[layer], fan_ins[layer]
        weights[layer] = acc_w[layer][:, :fan_in].view(e, fan_in, nt, width).permute(2, 0, 1, 3)
        biases[layer] = acc_b[layer].view(e, nt, width).transpose(0, 1)
    return weights, biases


#: rows per chunk of :func:`_expert_task_gradients` (its per-chunk intermediates, about
#: ``E * rows * T * H`` values, then stay in the CPU's caches). On bench-v1 (2 threads, PCGrad
#: step, interleaved): 128 / 256 / 512 / 1024 rows took 44.3 / 40.3 / 37.1 / 36.7 ms with a
#: bfloat16 body and 52.7 / 51.6 / 50.8 / 51.6 ms in float32.
_ROW_CHUNK = 512


# Whether the fused body copies its strided intermediates to plain layouts: ``None`` = only for
# low-precision compute (oneDNN's bfloat16 GEMMs copy strided operands themselves, MKL's float32
# ones read them at full speed). Tests force both branches.
PLAIN_LAYOUTS: bool | None = None


class Workspace:
    """Reusable scratch buffers for fused kernels, so that a training step does not allocate
    (and page-fault in) tens of MB of fresh memory every time.

    :meth:`take` hands out a *view* of a pooled buffer and reuses a buffer only when nothing but
    the pool holds its storage (no saved activation of a live graph, no returned tensor), so
    reuse is never visible: a graph kept for a second backward (``retain_graph=True``) or a
    tensor the caller keeps simply makes the pool allocate another buffer (at most
    ``max_per_shape`` pooled per shape; beyond that plain allocations). The pool is not part of
    the module's state and is dropped when pickled.
    """

    def __init__(self, max_per_shape: int = 4) -> None:
        self.max_per_shape = max_per_shape
        self._buffers: dict[tuple, list[Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        key = (tuple(shape), like.dtype, like.device)
        pool = self._buffers.setdefault(key, [])
        for buf in pool:
            if _only_pool_holds(buf):
                return buf.view(shape)
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        if len(pool) < self.max_per_shape:
            pool.append(buf)
            return buf.view(shape)
        return buf

    def clear(self) -> None:
        self._buffers.clear()

    def __getstate__(self) -> dict:
        return {"max_per_shape": self.max_per_shape, "_buffers": {}}

    def __deepcopy__(self, memo: dict) -> "Workspace":
        return Workspace(self.max_per_shape)


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:
    # Use count of a storage held by exactly one tensor, as _storage_refs sees it (the call
    # itself holds a temporary reference).
    _LONE_STORAGE_REFS: int | None = _storage_refs(torch.empty(1))
except (AttributeError, RuntimeError):  # private API gone: never reuse (always correct)
    _LONE_STORAGE_REFS = None


def _only_pool_holds(buf: Tensor) -> bool:
    return _LONE_STORAGE_REFS is not None and _storage_refs(buf) <= _LONE_STORAGE_REFS


def _softmax_small(logits: Tensor) -> Tensor:
    """Softmax over a short last dimension (the experts): ``torch.softmax`` is ~3x slower on
    CPU when that dimension has only a few entries."""
    g = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return g.div_(g.sum(dim=-1, keepdim=True))


class _FusedSaved(NamedTuple):
    """What :class:`_MMoEFunction` keeps from its forward (compute dtype), by name.

    ``E`` experts, ``K`` tasks, ``B`` rows; ``hs[l]`` is expert layer ``l``'s output after its
    ReLU, ``[E, B, H_l]`` (``hs[0]`` may be a strided view of ``z``).
    """

    x: Tensor  #: ``[B, D]`` the body's input
    z: Tensor  #: ``[B, E*H_0 + K*E]`` first GEMM: experts' first layer (after ReLU), gate logits
    gates: Tensor  #: ``[B, K, E]`` gate distributions
    w_cat: Tensor  #: ``[D, E*H_0 + K*E]`` experts' first-layer and gate weights, concatenated
    hs: list[Tensor]  #: expert layer outputs ``[E, B, H_l]``
    hs_b: Tensor  #: ``hs[-1]`` as ``[B, E, H]``
    ts: list[Tensor]  #: tower layer inputs ``[K, B, *]``; ``ts[0]`` = the mixtures
    ew_rest: list[Tensor]  #: expert weights of layers ``1..`` ``[E, H_{l-1}, H_l]``
    tw: list[Tensor]  #: tower weights ``[K, in, out]``
    scale: Tensor | None  #: ``[K]`` ``task_grad_scale`` or ``None``


def _unpack_saved(ctx) -> _FusedSaved:
    """The saved tensors of an :class:`_MMoEFunction` node (its ``ctx``) by name; the one
    reader of the layout written in :meth:`_MMoEFunction.forward`."""
    le, lt = ctx.le, ctx.lt
    saved = list(ctx.saved_tensors)
    x, z, gates, w_cat = saved[:4]
    pos = 4
    hs_rest = saved[pos : pos + le - 1]
    pos += le - 1
    ts = saved[pos : pos + lt]
    pos += lt
    ew_rest = saved[pos : pos + le - 1]
    pos += le - 1
    tw = saved[pos : pos + lt]
    pos += lt
    scale = saved[pos].to(x.dtype) if ctx.has_scale else None
    b, k, e = gates.shape
    if ctx.separate_first:
        hs = [saved[-2], *hs_rest]
        hs_b = saved[-1]
    else:
        eh = z.shape[1] - k * e
        hs = [z[:, :eh].view(b, e, eh // e).transpose(0, 1), *hs_rest]
        hs_b = hs[-1].transpose(0, 1)
    return _FusedSaved(x, z, gates, w_cat, hs, hs_b, ts, ew_rest, tw, scale)


def _param_grad_needed(ctx, index: int) -> bool:
    """Whether the backward pass now running uses the gradient of parameter input ``index``
    (position in ``*params``): it is required (``needs_input_grad``) and the engine will run
    the node it flows to (not the case for parameters left out of ``backward(inputs=...)``)."""
    if not ctx.needs_input_grad[5 + index]:
        return False
    # next_functions has one edge per *tensor* input: x, scale (if given), then the parameters.
    node = ctx.next_functions[1 + int(ctx.has_scale) + index][0]
    if node is None or _will_engine_execute_node is None:
        return True
    try:
        return bool(_will_engine_execute_node(node))
    except RuntimeError:  # not inside an engine-run backward (e.g. a direct call): be safe
        return True


_will_engine_execute_node = getattr(torch._C, "_will_engine_execute_node", None)


def _relu_grad_(grad: Tensor, out: Tensor, result: Tensor | None = None) -> Tensor:
    """``grad * (out > 0)`` written into ``result`` (default: into ``grad``)."""
    dest = grad if result is None else result
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0.0, grad_input=dest)


class _MMoEFunction(torch.autograd.Function):
    """The whole MMoE body (experts, gates, mixing, towers) with a hand-written backward.

    Mathematically the composition of :class:`~mtl.models.layers.BatchedMLP` (experts, shared
    input), a softmax gate per task, :func:`~mtl.models.layers.mix_experts` and the tower
    :class:`~mtl.models.layers.BatchedMLP` (tests/test_fast_path.py checks logits and every
    gradient against a per-module computation). It is faster on CPU because the experts' first
    layer and all gates are one GEMM (forward and backward), ReLUs and their gradients are
    applied in place, GEMMs write straight into the layout the next one reads, and large
    intermediates live in reused :class:`Workspace` buffers instead of fresh memory.

    Inputs: ``x`` ``[B, D]``; ``scale`` ``[K]`` or ``None`` (``task_grad_scale``); the layer
    counts; the workspace (or ``None``); then the parameters: expert weights (``[E, in, out]``
    per layer), expert biases (``[E, 1, out]``), gate weight ``[K*E, D]`` and bias ``[K*E]``,
    tower weights ``[K, in, out]`` and biases ``[K, 1, out]`` (the last tower layer has
    ``out == 1``). Output: logits ``[B, K]``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        scale: Tensor | None,
        n_expert_layers: int,
        n_tower_layers: int,
        ws: Workspace | None,
        *params: Tensor,
    ) -> Tensor:
        le, lt = n_expert_layers, n_tower_layers
        ew, eb = params[:le], params[le : 2 * le]
        gw, gb = params[2 * le], params[2 * le + 1]
        tw, tb = params[2 * le + 2 : 2 * le + 2 + lt], params[2 * le + 2 + lt :]
        b, d = x.shape
        e, h1 = ew[0].shape[0], ew[0].shape[2]
        k = tw[0].shape[0]
        eh = e * h1

        def buf(*shape: int) -> Tensor:
            return ws.take(shape, x) if ws is not None else torch.empty(shape, dtype=x.dtype, device=x.device)

        # Experts' first layer and all gates: one GEMM.
        w_cat = torch.cat([ew[0].permute(1, 0, 2).reshape(d, eh), gw.t()], dim=1)  # [D, E*H1 + K*E]
        b_cat = torch.cat([eb[0].reshape(eh), gb])
        z = torch.addmm(b_cat, x, w_cat, out=buf(b, eh + k * e))
        gates = _softmax_small(z[:, eh:].view(b, k, e))  # [B, K, E]
        first = z[:, :eh].relu_().view(b, e, h1).transpose(0, 1)  # [E, B, H1], strided view of z
        separate_first = PLAIN_LAYOUTS if PLAIN_LAYOUTS is not None else x.dtype not in (torch.float32, torch.float64)
        if separate_first:
            # oneDNN (bfloat16) would copy this strided operand in two GEMMs: copy it once to a
            # per-expert-contiguous buffer instead (MKL reads the strided view at full speed).
            first = buf(e, b, h1).copy_(first)
        hs = [first]
        for layer in range(1, le):
            out = buf(e, b, ew[layer].shape[2])
            hs.append(torch.baddbmm(eb[layer], hs[-1], ew[layer], out=out).relu_())
        h = hs[-1].shape[2]
        hs_b = hs[-1].transpose(0, 1)  # [B, E, H]
        if separate_first:  # oneDNN: plain layouts, one explicit copy instead of several implicit ones
            hs_b = buf(b, e, h).copy_(hs_b)
        mixed = torch.bmm(gates, hs_b, out=buf(b, k, h))  # [B, K, H]
        ts = [mixed.transpose(0, 1)]  # [K, B, H]
        if separate_first:
            ts[0] = buf(k, b, h).copy_(ts[0])
        for layer in range(lt - 1):
            ts.append(torch.baddbmm(tb[layer], ts[-1], tw[layer], out=buf(k, b, tw[layer].shape[2])).relu_())
        # Last tower layer (width 1): a multiply-and-sum is ~3x faster than an N=1 bmm on CPU.
        last = ts[-1]
        prod = torch.mul(last, tw[-1].transpose(1, 2), out=buf(*last.shape))
        # Summed in float32 whatever the compute dtype: bfloat16-rounded logits would tie many
        # scores (a step of 1/64 around |logit| ~ 3), which costs ranking metrics.
        logits = prod.sum(-1, dtype=torch.promote_types(x.dtype, torch.float32)).add_(tb[-1].view(k, 1))  # [K, B]; not a workspace buffer
        ctx.le, ctx.lt, ctx.has_scale, ctx.ws = le, lt, scale is not None, ws
        ctx.separate_first = separate_first
        # The layout of the saved tensors is defined here and read back only by _unpack_saved.
        saved = [x, z, gates, w_cat, *hs[1:], *ts, *ew[1:], *tw]
        if scale is not None:
            saved.append(scale)
        if separate_first:
            saved += [hs[0], hs_b]
        ctx.save_for_backward(*saved)
        return logits.t()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        le, lt, ws = ctx.le, ctx.lt, ctx.ws
        sv = _unpack_saved(ctx)
        x, z, gates, w_cat, hs, hs_b = sv.x, sv.z, sv.gates, sv.w_cat, sv.hs, sv.hs_b
        grad = grad.to(x.dtype)  # the logits are at least float32 (see forward)
        ts, ew_rest, tw, scale = sv.ts, sv.ew_rest, sv.tw, sv.scale
        b, k, e = gates.shape
        eh = z.shape[1] - k * e
        h1 = eh // e
        # Expert parameters whose gradient the engine will use: a backward restricted to other
        # parameters (``inputs=``, e.g. the strategies' direct path after
        # MMoE.shared_task_gradients) skips the experts' weight-gradient products.
        need_ew = [_param_grad_needed(ctx, i) for i in range(2 * le)]

        def buf(*shape: int) -> Tensor:
            return ws.take(shape, x) if ws is not None else torch.empty(shape, dtype=x.dtype, device=x.device)

        # Towers, last layer first.
        d_tw: list[Tensor] = [None] * lt  # type: ignore[list-item]
        d_tb: list[Tensor] = [None] * lt  # type: ignore[list-item]
        gl = grad.t().unsqueeze(-1)  # [K, B, 1]
        last = ts[lt - 1]
        d_tw[lt - 1] = torch.mul(last, gl, out=buf(*last.shape)).sum(1).unsqueeze(-1)  # [K, T, 1]
        d_tb[lt - 1] = gl.sum(1, keepdim=True)
        dt = torch.mul(gl, tw[lt - 1].transpose(1, 2), out=buf(*last.shape))  # [K, B, T]
        if lt > 1:
            _relu_grad_(dt, last)
        for layer in reversed(range(lt - 1)):
            d_tw[layer] = torch.bmm(ts[layer].transpose(1, 2), dt)
            d_tb[layer] = dt.sum(1, keepdim=True)
            dt = torch.bmm(dt, tw[layer].transpose(1, 2), out=buf(k, b, tw[layer].shape[1]))
            if layer > 0:
                _relu_grad_(dt, ts[layer])
        # dt: gradient w.r.t. the mixtures [K, B, H] (each task's own, unscaled).
        h = dt.shape[2]
        dt_b = dt.transpose(0, 1)  # [B, K, H]
        if ctx.separate_first:
            dt_b = buf(b, k, h).copy_(dt_b)
        d_gates = torch.bmm(dt_b, hs_b.transpose(1, 2))  # [B, K, E]
        d_gate_logits = gates * (d_gates - (d_gates * gates).sum(-1, keepdim=True))  # [B, K, E]
        # task_grad_scale: task k's gradient into the experts is scaled by scale[k]; folded into
        # the (small) gate weights of the mixing's backward instead of the [B, K, H] gradient.
        gates_mix = gates if scale is None else gates * scale.view(1, k, 1)

        # Experts, last layer first; the first layer is done together with the gates in dz.
        dz = buf(b, eh + k * e)  # gradient w.r.t. the first GEMM's output
        dz_experts = dz[:, :eh].view(b, e, h1)  # [B, E, H1]
        d_ew: list[Tensor] = [None] * le  # type: ignore[list-item]
        d_eb: list[Tensor] = [None] * le  # type: ignore[list-item]
        if le == 1:
            torch.bmm(gates_mix.transpose(1, 2), dt_b, out=dz_experts)
        else:
            d_h = torch.bmm(gates_mix.transpose(1, 2), dt_b, out=buf(b, e, h))  # [B, E, H]
            d_h = _relu_grad_(d_h.transpose(0, 1), hs[-1], buf(e, b, h))  # [E, B, H]
            for layer in reversed(range(1, le)):
                if layer < le - 1:
                    _relu_grad_(d_h, hs[layer])
                if need_ew[layer]:
                    d_ew[layer] = torch.bmm(hs[layer - 1].transpose(1, 2), d_h)
                if need_ew[le + layer]:
                    d_eb[layer] = d_h.sum(1, keepdim=True)
                w_t = ew_rest[layer - 1].transpose(1, 2)
                if layer > 1:
                    d_h = torch.bmm(d_h, w_t, out=buf(e, b, w_t.shape[2]))
                else:
                    torch.bmm(d_h, w_t, out=dz_experts.transpose(0, 1))
        _relu_grad_(dz_experts, hs[0].transpose(0, 1))
        dz[:, eh:] = d_gate_logits.view(b, k * e)
        if need_ew[0]:
            d_wcat = torch.mm(x.t(), dz)  # [D, E*H1 + K*E]
            d_ew[0] = d_wcat[:, :eh].reshape(-1, e, h1).transpose(0, 1).contiguous()
            d_gw = d_wcat[:, eh:].t().contiguous()
        else:
            d_gw = torch.mm(dz[:, eh:].t(), x)  # [K*E, D]
        if need_ew[le]:
            d_bcat = dz.sum(0)
            d_eb[0] = d_bcat[:eh].reshape(e, 1, h1)
            d_gb = d_bcat[eh:]
        else:
            d_gb = dz[:, eh:].sum(0)
        d_x = None
        if ctx.needs_input_grad[0]:
            if scale is not None:
                dz[:, eh:] = (d_gate_logits * scale.view(1, k, 1)).view(b, k * e)
            d_x = torch.mm(dz, w_cat.t())
        return (d_x, None, None, None, None, *d_ew, *d_eb, d_gw, d_gb, *d_tw, *d_tb)
