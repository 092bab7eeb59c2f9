"""Where the ranks' gradients meet: the one synchronisation policy of data-parallel training
(``torch.distributed`` only; no Ray import).

Three modes (``shared/docs/surgery_under_ddp.md``), chosen by :class:`GradientSync`'s ``mode``:

- ``"local"``: each rank combines its own per-task gradients (ordering 1, "surgery before the
  all-reduce"); then one all-reduce of the combined gradients, exactly the traffic of plain
  data parallelism.
- ``"global"``: the ``[K, P]`` per-task gradients of the dense shared parameters are
  all-reduced first (:attr:`Strategy.grad_reducer`); every rank computes identical
  coefficients, so ``N`` ranks equal one process on the union of their batches. Extra traffic:
  ``K * P`` values on refresh steps.
- ``"gram"``: only the ``K x K`` Gram matrices are all-reduced (:attr:`Strategy.gram_reducer`):
  identical coefficients, ``K^2`` extra values, but from the mean of the local Gram matrices.

Why not a DDP wrapper: strategies write some shared gradients directly (``write_flat_grad``)
and DDP's reducer hooks fire only for gradients produced by autograd, so those writes would
never be averaged. :meth:`GradientSync.sync_gradients` therefore runs after the whole backward:
dense gradients in coalesced buckets (one ``all_reduce`` per bucket), row-sparse embedding
gradients by all-gathering the touched row ids and their rows (three collectives for all
tables together, dense tensors only: NCCL has no sparse all-reduce). The same code runs on
gloo (CPU) and NCCL (CUDA).

State that must stay identical on every rank:

- losses that drive state (DWA, FAMO, GradNorm, DB-MTL) are all-reduced (``stat_reducer``,
  ``K`` values) whenever the strategy reads them (:attr:`Strategy.loss_driven_state`);
- in ``local`` and ``gram`` mode, state computed from a rank's own gradients (GradVac's
  targets, GradNorm's weights, DB-MTL's gradient EMAs, Nash-MTL's warm start) is averaged
  after each step (:meth:`GradientSync.sync_strategy_state`; the EMAs are linear, so the mean
  of the ranks' EMAs is the EMA of the mean gradients);
- randomness (PCGrad/GradVac task orders) comes from generators seeded alike on every rank;
- parameters of a strategy (Uncertainty's log-variances) are averaged like model parameters.

Every collective goes through :class:`Collectives`, which counts the values it moves, so the
traffic of each mode is a tested number.

Example:
    >>> # dist.init_process_group("gloo", ...)
    >>> # sync = GradientSync(model, strategy, mode="global")
    >>> # losses, _ = model_backward(strategy, model, batch, labels)
    >>> # sync.sync_gradients(); optimizer.step(); sync.sync_strategy_state()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

SyncMode = Literal["local", "global", "gram"]
SYNC_MODES: tuple[str, ...] = ("local", "global", "gram")

#: dense gradients are all-reduced in buckets of at most this many bytes (as DDP's default 25 MiB)
BUCKET_BYTES = 25 * 1024 * 1024


def world_size() -> int:
    """The number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Collectives:
    """The collectives data-parallel training uses, each counting the values it sends.

    ``counts`` maps ``"all_reduce"`` / ``"all_gather"`` / ``"broadcast"`` to the number of
    values (tensor elements) this rank contributed; ``bytes`` the same in bytes.
    With one rank every call is a no-op that still counts nothing.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def _count(self, kind: str, t: Tensor) -> None:
        self.counts[kind] += t.numel()
        self.bytes[kind] += t.numel() * t.element_size()

    def all_reduce_mean_(self, t: Tensor) -> Tensor:
        """In-place mean over ranks (sum then divide; same result on every rank)."""
        if self.world_size == 1:
            return t
        self._count("all_reduce", t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.div_(self.world_size)

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Out-of-place mean over ranks (for the strategies' reducer hooks)."""
        return self.all_reduce_mean_(t.detach().clone())

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order."""
        if self.world_size == 1:
            return [t]
        self._count("all_gather", t)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def all_gather_varying(self, t: Tensor, sizes: list[int] | None = None) -> list[Tensor]:
        """Every rank's ``t`` whose first dimension may differ between ranks (padded gather).

        Args:
            sizes: every rank's first dimension, when the caller knows them already (saves one
                collective and one host read).
        """
        if self.world_size == 1:
            return [t]
        if sizes is None:
            n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
            sizes = [int(s) for s in torch.cat(self.all_gather(n)).tolist()]
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        return [g[:s] for g, s in zip(self.all_gather(padded), sizes)]

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        if self.world_size == 1:
            return t
        self._count("broadcast", t)
        dist.broadcast(t, src=src, group=self.group)
        return t

    def reset_counts(self) -> None:
        self.counts.clear()
        self.bytes.clear()


class GradientSync:
    """Averages gradients and strategy state over ranks in one of :data:`SYNC_MODES`.

    Args:
        model: the model (its parameters are synchronised).
        strategy: the task-balancing strategy; its reducer hooks are set for ``mode``.
        mode: ``"local"``, ``"global"`` or ``"gram"`` (see the module docstring).
        collectives: the (counting) collectives; a new one on the default group by default.
        bucket_bytes: the largest dense bucket.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: nn.Module,
        mode: str = "local",
        collectives: Collectives | None = None,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"sync mode must be one of {SYNC_MODES}, got {mode!r}")
        self.mode = mode
        self.comm = collectives or Collectives()
        self.bucket_bytes = bucket_bytes
        self.strategy = strategy
        self.parameters = [p for p in (*model.parameters(), *strategy.parameters()) if p.requires_grad]
        # tables with row-sparse gradients, fixed up front so that every rank runs the same
        # collectives even when a table got no gradient on one rank
        inputs = getattr(model, "inputs", None)
        sparse_tables = inputs.row_sparse_parameters() if getattr(inputs, "sparse_gradients", False) else []
        self._sparse_ids = {id(p) for p in sparse_tables}
        self._attach(strategy)

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def _attach(self, strategy: nn.Module) -> None:
        if self.world_size == 1:
            return
        if getattr(strategy, "loss_driven_state", False):
            strategy.stat_reducer = self.comm.all_reduce_mean
        if self.mode == "global" and getattr(strategy, "uses_representation", False):
            # MGDA-UB's rows are per-sample representation gradients: stacks of different
            # samples cannot be averaged, but the union batch's Gram matrix is the sum of the
            # ranks' (times 1/N^2 for the mean losses), and MGDA's answer does not change with
            # the Gram matrix's scale, so the mean of the Gram matrices is exact
            strategy.gram_reducer = self.comm.all_reduce_mean
        elif self.mode == "global":
            strategy.grad_reducer = self.comm.all_reduce_mean
        elif self.mode == "gram":
            strategy.gram_reducer = self.comm.all_reduce_mean

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0) -> None:
        """Make every rank start from ``src``'s parameters and buffers (model and strategy)."""
        if self.world_size == 1:
            return
        for t in self.parameters:
            self.comm.broadcast_(t.data, src)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average every parameter's gradient over ranks (after the step's whole backward).

        Dense gradients: one coalesced all-reduce per bucket of at most ``bucket_bytes``.
        Row-sparse (COO) gradients: all-gather of the touched row ids and their rows (see
        :meth:`_sync_sparse`). A parameter without a gradient on this rank is treated as a zero
        gradient, so ranks never disagree on which collectives run.
        """
        if self.world_size == 1:
            return
        sparse = [p for p in self.parameters if id(p) in self._sparse_ids]
        dense = [p for p in self.parameters if id(p) not in self._sparse_ids]
        for p in dense:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} outside the embedding tables has a sparse gradient")
        for bucket in _buckets(dense, self.bucket_bytes):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.comm.all_reduce_mean_(flat)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._sync_sparse(sparse)

    def _sync_sparse(self, params: Sequence[nn.Parameter]) -> None:
        """Row-sparse gradients as dense collectives: every rank gathers each table's touched
        row ids and rows; the mean gradient of a row is the sum of its rows over ranks / N.

        The set of tables with a sparse gradient must be the same on every rank (it is: every
        rank runs the same model on a batch of every feature)."""
        if not params:
            return
        coalesced = [_as_sparse(p) for p in params]
        device = coalesced[0].device
        counts = torch.tensor([g._nnz() for g in coalesced], dtype=torch.long, device=device)
        ids = torch.cat([g.indices()[0] for g in coalesced])
        dtype = coalesced[0].values().dtype
        values = torch.cat([g.values().reshape(-1).to(dtype) for g in coalesced])
        widths = [_row_width(p) for p in params]
        # one host read: every rank's row count per table gives both gathers' sizes
        all_counts = [c.tolist() for c in self.comm.all_gather(counts)]
        all_ids = self.comm.all_gather_varying(ids, [sum(c) for c in all_counts])
        all_values = self.comm.all_gather_varying(values, [sum(n * w for n, w in zip(c, widths)) for c in all_counts])
        n = self.world_size
        per_table_ids: list[list[Tensor]] = [[] for _ in params]
        per_table_vals: list[list[Tensor]] = [[] for _ in params]
        for r in range(n):
            id_cut = all_counts[r]
            id_parts = torch.split(all_ids[r], id_cut)
            val_cut = [c * w for c, w in zip(id_cut, widths)]
            val_parts = torch.split(all_values[r], val_cut)
            for i, p in enumerate(params):
                per_table_ids[i].append(id_parts[i])
                per_table_vals[i].append(val_parts[i].reshape(-1, *p.shape[1:]))
        for i, p in enumerate(params):
            idx = torch.cat(per_table_ids[i]).unsqueeze(0)
            vals = torch.cat(per_table_vals[i]).to(p.dtype).div_(n)
            p.grad = torch.sparse_coo_tensor(idx, vals, p.shape, check_invariants=False).coalesce()

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def sync_strategy_state(self) -> None:
        """Average a gradient strategy's floating-point buffers over ranks (``local``/``gram``
        modes, where they may come from a rank's own gradients); a no-op in ``global`` mode,
        where every rank computed them from the same all-reduced numbers, and for loss-weighting
        strategies, whose state comes from all-reduced losses."""
        if self.world_size == 1 or self.mode == "global" or not getattr(self.strategy, "uses_gradients", False):
            return  # loss-weighting state comes from all-reduced losses: already identical
        buffers = [b for b in self.strategy.buffers() if b.is_floating_point()]
        if not buffers:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in buffers:
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = self.comm.all_reduce_mean_(torch.cat([b.reshape(-1) for b in group]))
            offset = 0
            for b in group:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def mean_over_ranks(self, t: Tensor) -> Tensor:
        """The mean of a (small) tensor over ranks, e.g. losses for logging."""
        return self.comm.all_reduce_mean(t)


def _as_sparse(p: nn.Parameter) -> Tensor:
    """``p``'s gradient as a coalesced COO tensor (an empty one when there is none)."""
    g = p.grad
    if g is None:
        return torch.sparse_coo_tensor(
            torch.empty(1, 0, dtype=torch.long, device=p.device), p.new_empty((0, *p.shape[1:])), p.shape
        ).coalesce()
    if not g.is_sparse:
        return g.to_sparse(1).coalesce()  # e.g. a dense gradient written into a table
    return g.coalesce()


def _row_width(p: Tensor) -> int:
    width = 1
    for d in p.shape[1:]:
        width *= d
    return width


def _buckets(params: Iterable[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped by dtype and device into buckets of <= ``bucket_bytes``."""
    buckets: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > bucket_bytes or p.dtype != current[0].dtype or p.device != current[0].device):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def params_equal_across_ranks(params: Iterable[Tensor], comm: Collectives | None = None) -> bool:
    """True if every rank holds bit-identical values (a check for tests and debugging)."""
    comm = comm or Collectives()
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    gathered = comm.all_gather(flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
