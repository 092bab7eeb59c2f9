"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020); CGC is one level."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.base import Batch, MultiTaskModel
from mtl.models.cross import expert_block
from mtl.models.grad_scale import LiveScale, Scale, scale_grad
from mtl.models.layers import BatchedMLP, mix_experts, shared_input_linear, stacked_owners
from mtl.precision import Precision


class _ExtractionLevel(nn.Module):
    """One extraction network: shared experts, per-task experts, per-task gates over
    (own experts + shared experts) and, except on the last level, a shared gate over all.

    Expert order at a level (``E = sum(n_k) + S``): task experts grouped by task
    (task 0's ``n_0``, then task 1's, ...), then the ``S`` shared experts.
    Task ``k``'s gate is a row block of ``n_k + S`` rows; the blocks of tasks whose gate at
    this level is a shared parameter (``gate_shared[k]``) are stacked in ``gate_weight_shared``,
    the others in ``gate_weight_task``; both are scattered into one ``[K * E, in_dim]`` matrix
    whose entries for other tasks' experts are masked to ``-inf`` before the softmax.
    """

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        task_experts: list[int],
        num_shared: int,
        expert_hidden: list[int],
        first: bool,
        shared_gate: bool,
        gate_shared: list[bool],
        expert_type: str = "mlp",
        cross: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        k = num_tasks
        self.num_tasks = k
        self.first = first
        self.num_task_experts = sum(task_experts)
        self.num_shared = num_shared
        self.num_experts = e = self.num_task_experts + num_shared
        self.shared_experts = (
            expert_block(expert_type, num_shared, in_dim, expert_hidden, shared_input=True, cross=cross, dropout=dropout)
            if num_shared else None
        )
        self.task_experts = (
            expert_block(expert_type, self.num_task_experts, in_dim, expert_hidden, shared_input=first, cross=cross,
                         dropout=dropout)
            if self.num_task_experts
            else None
        )
        self.register_buffer(
            "expert_owner", torch.arange(k).repeat_interleave(torch.tensor(task_experts, dtype=torch.long))
        )
        offsets = [0]
        for n in task_experts:
            offsets.append(offsets[-1] + n)
        index: dict[bool, list[int]] = {True: [], False: []}
        owner: dict[bool, list[int]] = {True: [], False: []}
        allowed = torch.zeros(k, e, dtype=torch.bool)
        for t in range(k):
            cols = list(range(offsets[t], offsets[t + 1])) + list(range(self.num_task_experts, e))
            allowed[t, cols] = True
            index[gate_shared[t]] += [t * e + c for c in cols]
            owner[gate_shared[t]] += [t] * len(cols)
        self.register_buffer("allowed", allowed)
        self.all_allowed = bool(allowed.all())
        bound = 1.0 / math.sqrt(in_dim)
        for part, is_shared in (("shared", True), ("task", False)):
            rows = len(index[is_shared])
            self.register_buffer(f"gate_index_{part}", torch.tensor(index[is_shared], dtype=torch.long))
            self.register_buffer(f"gate_owner_{part}", torch.tensor(owner[is_shared], dtype=torch.long))
            w = nn.Parameter(torch.empty(rows, in_dim).uniform_(-bound, bound)) if rows else None
            b = nn.Parameter(torch.empty(rows).uniform_(-bound, bound)) if rows else None
            self.register_parameter(f"gate_weight_{part}", w)
            self.register_parameter(f"gate_bias_{part}", b)
        self.shared_gate = nn.Linear(in_dim, e) if shared_gate else None

    def gate_params(self, part: str) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        return getattr(self, f"gate_weight_{part}"), getattr(self, f"gate_bias_{part}")

    def _gate_matrix(self) -> tuple[Tensor, Tensor]:
        k, e = self.num_tasks, self.num_experts
        ref = self.gate_weight_shared if self.gate_weight_shared is not None else self.gate_weight_task
        assert ref is not None
        weight = ref.new_zeros(k * e, ref.shape[1])
        bias = ref.new_zeros(k * e)
        for part in ("shared", "task"):
            w, b = self.gate_params(part)
            if w is not None and b is not None:
                idx = getattr(self, f"gate_index_{part}")
                weight = weight.index_copy(0, idx, w)
                bias = bias.index_copy(0, idx, b)
        return weight, bias

    def task_gates(self, task_in: Tensor, scale: Scale | None) -> Tensor:
        """Per-task distributions ``[B, K, E]`` (exact zeros on other tasks' experts).

        ``task_in``: ``[B, in_dim]`` shared input (first level) or ``[K, B, in_dim]``;
        ``scale``: ``[K]`` gradient scale where task ``k``'s gate reads ``task_in`` (or ``None``)."""
        k, e = self.num_tasks, self.num_experts
        weight, bias = self._gate_matrix()
        if task_in.dim() == 2:
            logits = shared_input_linear(task_in, weight, bias, scale).view(task_in.shape[0], k, e)
        else:
            if scale is not None:
                task_in = scale_grad(task_in, scale.view(k, 1, 1))
            logits = torch.baddbmm(bias.view(k, 1, e), task_in, weight.view(k, e, -1).transpose(1, 2))
            logits = logits.transpose(0, 1)  # [B, K, E]
        if not self.all_allowed:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def shared_gate_weights(self, shared_in: Tensor) -> Tensor:
        """The shared gate's distribution over all experts, ``[B, E]``."""
        assert self.shared_gate is not None
        return torch.softmax(self.shared_gate(shared_in), dim=-1)

    def experts(self, task_in: Tensor, shared_in: Tensor, task_expert_scale: Tensor | None) -> Tensor:
        """All expert outputs ``[E, B, H]`` (task experts first, then shared);
        ``task_expert_scale`` ``[K]`` scales task experts' gradient into a shared ``task_in``."""
        outs = []
        if self.task_experts is not None:
            if self.first:
                member_scale = None if task_expert_scale is None else LiveScale(
                    task_expert_scale, lambda c, owner=self.expert_owner: c[owner])
                outs.append(self.task_experts(task_in, member_scale))
            else:
                outs.append(self.task_experts(task_in.index_select(0, self.expert_owner)))
        if self.shared_experts is not None:
            outs.append(self.shared_experts(shared_in))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class PLE(MultiTaskModel):
    """Progressive Layered Extraction with ``num_levels`` extraction networks (CGC = 1 level).

    Level ``l`` has ``S`` shared experts and ``n_k`` experts per task ``k``. Task ``k``'s gate
    (a softmax over its own ``n_k`` experts and the ``S`` shared ones) mixes them into task
    ``k``'s output; on every level but the last a shared gate (softmax over all experts)
    mixes everything into the shared output. Level ``l + 1``'s task-``k`` experts and gate read
    task ``k``'s output of level ``l``; its shared experts and shared gate read the shared output.
    The level-0 inputs are all the input representation. Towers read the last level's task
    outputs.

    What is shared (with ``L`` levels): whatever a shared gate reads reaches every task, so
    shared experts and shared gates of all levels and task experts of levels ``< L - 1`` are
    shared parameters; task ``k``'s gate at level ``l`` is shared when ``n_k > 0`` and
    ``l < L - 2`` (its output then feeds task ``k``'s next-level experts, which a shared gate
    reads). Task-specific: the other task gates, the last level's task experts, the towers.
    ``task_grad_scale`` scales task ``k``'s gradient exactly on the edges where a shared tensor
    enters task ``k``'s task-specific computation: a task-specific gate reading a shared input,
    a task-specific mixture reading a shared expert, and (one level only) task experts reading
    the input representation.

    Reference: Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        num_levels: number of extraction networks (1 = CGC).
        num_shared_experts: ``S`` shared experts per level (>= 1 when ``num_levels > 1``).
        task_experts: experts per task per level: one int for all tasks or a list of K ints
            (may differ, may be 0 as long as ``n_k + S >= 1``).
        expert_hidden: expert MLP widths (ReLU after each); the last is the level output width.
            Same for every level.
        tower_hidden: tower widths before the final logit.
        sparse_gradients: row-sparse embedding gradients.
        compute_dtype: body precision (:mod:`mtl.precision`), applied by ``forward``.
        expert_type: ``"mlp"`` or ``"cross"`` (every expert: DCN-v2 cross layers, then the
            ``expert_hidden`` MLP; :class:`~mtl.models.cross.BatchedCrossNet`).
        cross: cross expert options (``layers``, ``rank``, ``mixtures``).
        dropout: dropout after each hidden layer of the experts and towers in training mode
            (:class:`~mtl.models.layers.BatchedMLP`); 0 = off.

    Example:
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b", "c"])
        >>> m = PLE(spec, num_levels=2, num_shared_experts=1, task_experts=[1, 2, 0],
        ...         expert_hidden=[8], tower_hidden=[4])
        >>> m({"u": torch.tensor([1, 2])}).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        num_levels: int = 2,
        num_shared_experts: int = 2,
        task_experts: int | list[int] = 1,
        expert_hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
        expert_type: str = "mlp",
        cross: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        k = self.num_tasks
        counts = [task_experts] * k if isinstance(task_experts, int) else list(task_experts)
        if len(counts) != k:
            raise ValueError(f"ple: task_experts has {len(counts)} entries for {k} tasks {self.task_names}")
        if num_levels < 1 or num_shared_experts < 0 or any(n < 0 for n in counts):
            raise ValueError(
                f"ple: need num_levels >= 1 and non-negative expert counts, got {num_levels=}, "
                f"{num_shared_experts=}, task_experts={counts}"
            )
        if num_levels > 1 and num_shared_experts < 1:
            raise ValueError(f"ple: num_levels={num_levels} > 1 needs num_shared_experts >= 1")
        empty = [self.task_names[t] for t in range(k) if counts[t] + num_shared_experts == 0]
        if empty:
            raise ValueError(f"ple: tasks {empty} have no expert (task_experts 0 and num_shared_experts 0)")
        expert_hidden = list(expert_hidden) if expert_hidden else [128, 64]
        tower_hidden = list(tower_hidden) if tower_hidden is not None else [32]
        n_lvl = num_levels
        self.num_levels = n_lvl
        self.task_expert_counts = counts
        self.levels = nn.ModuleList()
        in_dim = self.inputs.output_dim
        n_task = sum(counts)
        for lvl in range(n_lvl):
            gate_shared = [counts[t] > 0 and lvl < n_lvl - 2 for t in range(k)]
            in_shared = [lvl == 0 or (counts[t] > 0 and lvl < n_lvl - 1) for t in range(k)]
            level = _ExtractionLevel(
                k, in_dim, counts, num_shared_experts, expert_hidden,
                first=lvl == 0, shared_gate=lvl < n_lvl - 1, gate_shared=gate_shared,
                expert_type=expert_type, cross=cross, dropout=dropout,
            )  # fmt: skip
            # Where task k's gradient is scaled (a shared tensor entering task-specific code):
            gate_mask = torch.tensor([not gs and ins for gs, ins in zip(gate_shared, in_shared)])
            expert_is_shared = torch.tensor([lvl < n_lvl - 1] * n_task + [True] * num_shared_experts)
            mix_mask = (~torch.tensor(gate_shared)).view(k, 1) & expert_is_shared.view(1, -1)
            level.register_buffer("gate_scale_mask", gate_mask)
            level.register_buffer("mix_scale_mask", mix_mask)
            level.scale_gates = bool(gate_mask.any())
            level.scale_mix = bool(mix_mask.any())
            # Task experts read a shared input from task-specific code only with one level.
            level.scale_task_experts = n_lvl == 1
            self.levels.append(level)
            in_dim = expert_hidden[-1]
        self.towers = BatchedMLP(k, in_dim, tower_hidden, out_dim=1, shared_input=False, dropout=dropout)

    def _run(
        self, x: Tensor, task_grad_scale: Tensor | None, record: dict[str, Tensor] | None = None
    ) -> Tensor:
        """Task outputs of the last level ``[K, B, H]``; gates go to ``record`` if given."""
        c = task_grad_scale
        k = self.num_tasks
        task_in: Tensor = x  # [B, D] at level 0, then [K, B, H]
        shared_in: Tensor = x
        for lvl, level in enumerate(self.levels):
            gate_scale = mix_scale = expert_scale = None
            if c is not None:
                # derived from c when the backward runs: the strategy fills c after this forward
                if level.scale_gates:
                    gate_scale = LiveScale(c, lambda c, m=level.gate_scale_mask: torch.where(m, c, torch.ones_like(c)))
                if level.scale_mix:
                    mix_scale = LiveScale(c, lambda c, m=level.mix_scale_mask, e=level.num_experts: torch.where(
                        m, c.view(k, 1).expand(k, e), torch.ones((), dtype=c.dtype, device=c.device)))
                if level.scale_task_experts:
                    expert_scale = c
            gates = level.task_gates(task_in, gate_scale)  # [B, K, E]
            experts = level.experts(task_in, shared_in, expert_scale)  # [E, B, H]
            task_out = mix_experts(gates, experts, mix_scale)  # [K, B, H]; mix_scale is [K, E]
            if record is not None:
                record[f"gate_l{lvl}"] = gates
            if level.shared_gate is not None:
                shared_gates = level.shared_gate_weights(shared_in)  # [B, E]
                shared_in = mix_experts(shared_gates.unsqueeze(1), experts)[0]
                if record is not None:
                    record[f"shared_gate_l{lvl}"] = shared_gates
            task_in = task_out
        return task_in

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        return self.towers(self._run(x, task_grad_scale)).squeeze(-1).t()

    def routing_weights(self, batch: Batch) -> dict[str, Tensor]:
        """``gate_l{l}``: ``[B, K, E_l]`` task gates of level ``l`` (zero on other tasks' experts;
        expert order: task experts grouped by task, then shared); ``shared_gate_l{l}``:
        ``[B, E_l]`` for every level but the last; ``gate``: the last level's task gates."""
        record: dict[str, Tensor] = {}
        self._run(self.inputs(batch), None, record)
        record["gate"] = record[f"gate_l{self.num_levels - 1}"]
        return record

    def shared_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for lvl, level in enumerate(self.levels):
            for module in (level.shared_experts, level.shared_gate):
                if module is not None:
                    params += list(module.parameters())
            if level.task_experts is not None and lvl < self.num_levels - 1:
                params += list(level.task_experts.parameters())
            params += [p for p in level.gate_params("shared") if p is not None]
        return params

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """PLE has no single last shared layer: a task with no experts of its own reads the
        shared experts of every level through its own (task-specific) gates, and task-specific
        gates read mixtures weighted by shared gates. The layer closest to the towers is
        therefore the last layer of every shared expert block (shared experts, and task experts
        below the last level) plus every shared gate (the shared gate and the shared task gates);
        every other shared parameter (earlier expert layers) reaches the logits only through
        these."""
        params: list[nn.Parameter] = []
        for lvl, level in enumerate(self.levels):
            if level.shared_experts is not None:
                params += level.shared_experts.last_layer()
            if level.task_experts is not None and lvl < self.num_levels - 1:
                params += level.task_experts.last_layer()
            if level.shared_gate is not None:
                params += list(level.shared_gate.parameters())
            params += [p for p in level.gate_params("shared") if p is not None]
        return params

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        pairs: list[tuple[nn.Parameter, Tensor]] = []
        for lvl, level in enumerate(self.levels):
            owner = level.gate_owner_task.cpu()
            pairs += [(p, owner) for p in level.gate_params("task") if p is not None]
            if level.task_experts is not None and lvl == self.num_levels - 1:
                pairs += stacked_owners(level.task_experts, level.expert_owner.cpu())
        return pairs + stacked_owners(self.towers)
