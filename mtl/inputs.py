"""The input module: a batch of raw feature tensors -> one shared representation ``[B, D]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from mtl.features import PAD_ID, WEIGHT_SUFFIX, FeatureSpec, ListFeature, SparseFeature
from mtl.numeric import NumericEmbedding


# Standard deviation of the N(0, std^2) initialisation of embedding rows. Chosen on bench-v1
# (bench/README.md): of 0.1, 0.3 and 1.0 (PyTorch's nn.Embedding default), 0.3 gave the best
# held-out AUC on the rarest task on a selection split (seed 456) while staying well above the
# bare reference on the others; 0.01 learned the rarest task clearly worse in 300 steps.
EMBEDDING_INIT_STD = 0.3


def to_table_ids(ids: Tensor, vocab_size: int) -> Tensor:
    """Map raw ids to table rows: in-vocabulary ids keep their value, all others go to the
    OOV row ``vocab_size``. Padding (``PAD_ID``) is treated as OOV here; pooling masks it."""
    in_vocab = (ids >= 0) & (ids < vocab_size)
    return torch.where(in_vocab, ids, torch.full_like(ids, vocab_size))


class InputModule(nn.Module):
    """Embeds sparse ids, pools id lists, and concatenates them with dense and vector inputs.

    Output layout (fixed, so diagnostics can slice it): sparse embeddings in spec order, then
    pooled lists, then dense (a dense feature with a numeric encoding as its embedding,
    :mod:`mtl.numeric`), then vectors. ``output_dim == spec.input_dim``. Table rows start as
    ``N(0, EMBEDDING_INIT_STD^2)``.

    With ``sparse_gradients=True`` the single-id features are looked up through one
    unique-row lookup per group of equal-width tables (each distinct row gathered once; the
    backward forms a dense ``[U, dim]`` block and hands each table a row-sparse gradient whose
    rows are unique and sorted); values and gradients equal the plain ``nn.Embedding`` path.

    Args:
        spec: the feature spec.
        sparse_gradients: make embedding tables produce row-sparse gradients, so that an
            optimizer (``torch.optim.SparseAdam`` or :mod:`mtl.optim`) updates only the rows a
            batch touched.

    Example:
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 10, 4)], tasks=["a"])
        >>> InputModule(spec)({"u": torch.tensor([1, 99])}).shape
        torch.Size([2, 4])
    """

    def __init__(self, spec: FeatureSpec, sparse_gradients: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.sparse_gradients = sparse_gradients
        self.tables = nn.ModuleDict()
        for f in [*spec.sparse, *spec.lists]:
            table = nn.Embedding(f.vocab_size + 1, f.embedding_dim, sparse=sparse_gradients)
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            self.tables[f.name] = table
        self.output_dim = spec.input_dim
        # Dense features with a numeric encoding (mtl.numeric): dense parameters of the input.
        self.numeric = nn.ModuleDict({f.name: NumericEmbedding(f) for f in spec.dense if f.encoding is not None})
        # Fast row-sparse path: sparse features grouped by embedding width, each group looked up
        # with one unique + one gather (see :class:`_UniqueRowsLookup`).
        self._groups: list[_SparseGroup] = []
        by_dim: dict[int, list[SparseFeature]] = {}
        for f in spec.sparse:
            by_dim.setdefault(f.embedding_dim, []).append(f)
        for dim, feats in by_dim.items():
            sizes = [f.vocab_size for f in feats]
            starts = [0]
            for v in sizes:
                starts.append(starts[-1] + v + 1)
            self._groups.append(
                _SparseGroup(
                    names=[f.name for f in feats],
                    dim=dim,
                    vocab=torch.tensor(sizes, dtype=torch.long),
                    offsets=torch.tensor(starts[:-1], dtype=torch.long),
                    bounds=starts,
                )
            )
        # One group = all sparse features, already in spec order: its output is used whole.
        self._in_spec_order = len(self._groups) == 1

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The input's parameters: id tables (:meth:`row_sparse_parameters`), then the numeric
        embeddings' (dense gradients)."""
        return self.row_sparse_parameters() + list(self.numeric.parameters())

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """The id embedding tables (row-sparse gradients with ``sparse_gradients=True``)."""
        return [t.weight for t in self.tables.values()]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        parts: list[Tensor] = []
        if self.sparse_gradients and self.spec.sparse:
            parts.extend(self._embed_sparse_grouped(batch))
        else:
            for f in self.spec.sparse:
                parts.append(self._embed_sparse(f, _get(batch, f.name)))
        for f in self.spec.lists:
            parts.append(self._pool_list(f, batch))
        dtype = self.dtype
        for f in self.spec.dense:
            x = _get(batch, f.name).to(dtype)
            if f.name in self.numeric:
                parts.append(self.numeric[f.name](x))
            else:
                parts.append(x.unsqueeze(-1) if x.dim() == 1 else x)
        for f in self.spec.vectors:
            parts.append(_get(batch, f.name).to(dtype))
        return torch.cat(parts, dim=1)

    @property
    def dtype(self) -> torch.dtype:
        """The representation's dtype: the embedding tables' (float32 unless converted, e.g. by
        ``model.double()``); numeric columns are cast to it."""
        for table in self.tables.values():
            return table.weight.dtype
        return torch.get_default_dtype()

    def _embed_sparse(self, f: SparseFeature, ids: Tensor) -> Tensor:
        return self.tables[f.name](to_table_ids(ids.long(), f.vocab_size))

    def _embed_sparse_grouped(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """Sparse embeddings in spec order via one unique-row lookup per width group."""
        outputs: dict[str, Tensor] = {}
        whole: Tensor | None = None
        for g in self._groups:
            raw = torch.stack([_get(batch, name).long().reshape(-1) for name in g.names], dim=1)  # [B, F]
            vocab = g.vocab.to(raw.device)
            in_vocab = (raw >= 0) & (raw < vocab)
            rows = torch.where(in_vocab, raw, vocab) + g.offsets.to(raw.device)
            weights = [self.tables[name].weight for name in g.names]
            out = _UniqueRowsLookup.apply(rows, g.bounds, *weights)  # [B, F * dim]
            if self._in_spec_order:
                whole = out
            else:
                for i, name in enumerate(g.names):
                    outputs[name] = out[:, i * g.dim : (i + 1) * g.dim]
        if whole is not None:
            return [whole]
        return [outputs[f.name] for f in self.spec.sparse]

    def _pool_list(self, f: ListFeature, batch: Mapping[str, Tensor]) -> Tensor:
        ids = _get(batch, f.name).long()
        emb = self.tables[f.name](to_table_ids(ids, f.vocab_size))  # [B, L, E]
        mask = (ids != PAD_ID).to(emb.dtype)
        weights = mask
        if f.weighted:
            weights = _get(batch, f.name + WEIGHT_SUFFIX).to(emb.dtype) * mask
        pooled = torch.bmm(weights.unsqueeze(1), emb).squeeze(1)
        if f.pooling == "mean":
            pooled = pooled / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return pooled


class _SparseGroup(NamedTuple):
    names: list[str]
    dim: int
    vocab: Tensor  # [F] in-vocabulary sizes
    offsets: Tensor  # [F] first row of each table in the group's row numbering
    bounds: list[int]  # F + 1 row boundaries of the tables in that numbering


def _unique_rows(rows: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """``torch.unique(rows, sorted=True, return_inverse=True)`` for ids in ``[0, num_rows)``.

    When the id range is not much larger than the number of lookups, a presence bitmap and a
    prefix sum replace the sort (about 2x faster on CPU for bench-v1's 24,576 lookups over
    183,008 rows).
    """
    if num_rows > 16 * rows.numel() + 65536:
        return torch.unique(rows, sorted=True, return_inverse=True)
    mark = torch.zeros(num_rows, dtype=torch.int32, device=rows.device)
    mark[rows] = 1
    position = torch.cumsum(mark, 0, dtype=torch.int32)  # 1-based rank of each present row
    inverse = position[rows].long() - 1
    uniq = torch.empty(int(position[-1]), dtype=rows.dtype, device=rows.device)
    uniq[inverse] = rows
    return uniq, inverse


class _UniqueRowsLookup(torch.autograd.Function):
    """Embedding lookup of several tables at once that touches each distinct row once.

    ``rows`` ``[B, F]`` numbers the rows of the ``F`` tables consecutively (table ``f`` owns
    ``bounds[f] .. bounds[f+1]-1``). The forward gathers the ``U`` distinct rows once and expands
    them; the backward sums the output gradient into a dense ``[U, dim]`` block (no ``[V, dim]``
    zero-fill) and returns each table's gradient as a coalesced sparse COO tensor of its touched
    rows, which :mod:`mtl.optim` (or ``torch.optim.SparseAdam``) updates lazily.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, bounds: list[int], *weights: Tensor) -> Tensor:  # type: ignore[override]
        b, f = rows.shape
        uniq, inverse = _unique_rows(rows.reshape(-1), bounds[-1])
        cut = torch.searchsorted(uniq, torch.tensor(bounds, device=uniq.device)).tolist()
        dim = weights[0].shape[1]
        gathered = [
            F.embedding(uniq[cut[i] : cut[i + 1]] - bounds[i], w) for i, w in enumerate(weights)
        ]
        uniq_rows = torch.cat(gathered) if len(gathered) > 1 else gathered[0]  # [U, dim]
        ctx.save_for_backward(uniq, inverse)
        ctx.cut = cut
        ctx.bounds = bounds
        ctx.shapes = [w.shape for w in weights]
        return F.embedding(inverse, uniq_rows).view(b, f * dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        uniq, inverse = ctx.saved_tensors
        cut, bounds, shapes = ctx.cut, ctx.bounds, ctx.shapes
        dim = shapes[0][1]
        grad_rows = torch.zeros(uniq.numel(), dim, dtype=grad.dtype, device=grad.device)
        grad_rows.index_add_(0, inverse, grad.reshape(-1, dim))
        grads: list[Tensor | None] = []
        for i, shape in enumerate(shapes):
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                continue
            idx = (uniq[cut[i] : cut[i + 1]] - bounds[i]).unsqueeze(0)
            grads.append(
                torch.sparse_coo_tensor(idx, grad_rows[cut[i] : cut[i + 1]], shape, is_coalesced=True, check_invariants=False)
            )
        return (None, None, *grads)


def _get(batch: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return batch[name]
    except KeyError:
        raise KeyError(f"batch has no column {name!r} (has {sorted(batch)})") from None
