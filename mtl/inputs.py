"""The input module: a batch of raw feature tensors -> one shared representation ``[B, D]``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtl.features import PAD_ID, WEIGHT_SUFFIX, FeatureSpec, ListFeature, SparseFeature


def to_table_ids(ids: Tensor, vocab_size: int) -> Tensor:
    """Map raw ids to table rows: in-vocabulary ids keep their value, all others go to the
    OOV row ``vocab_size``. Padding (``PAD_ID``) is treated as OOV here; pooling masks it."""
    in_vocab = (ids >= 0) & (ids < vocab_size)
    return torch.where(in_vocab, ids, torch.full_like(ids, vocab_size))


class InputModule(nn.Module):
    """Embeds sparse ids, pools id lists, and concatenates them with dense and vector inputs.

    Output layout (fixed, so diagnostics can slice it): sparse embeddings in spec order, then
    pooled lists, then dense, then vectors. ``output_dim == spec.input_dim``.

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
            nn.init.normal_(table.weight, std=0.01)
            self.tables[f.name] = table
        self.output_dim = spec.input_dim

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.tables.values()]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        parts: list[Tensor] = []
        for f in self.spec.sparse:
            parts.append(self._embed_sparse(f, _get(batch, f.name)))
        for f in self.spec.lists:
            parts.append(self._pool_list(f, batch))
        for f in self.spec.dense:
            x = _get(batch, f.name).float()
            parts.append(x.unsqueeze(-1) if x.dim() == 1 else x)
        for f in self.spec.vectors:
            parts.append(_get(batch, f.name).float())
        return torch.cat(parts, dim=1)

    def _embed_sparse(self, f: SparseFeature, ids: Tensor) -> Tensor:
        return self.tables[f.name](to_table_ids(ids.long(), f.vocab_size))

    def _pool_list(self, f: ListFeature, batch: Mapping[str, Tensor]) -> Tensor:
        ids = _get(batch, f.name).long()
        mask = (ids != PAD_ID).float()
        weights = mask
        if f.weighted:
            weights = _get(batch, f.name + WEIGHT_SUFFIX).float() * mask
        emb = self.tables[f.name](to_table_ids(ids, f.vocab_size))  # [B, L, E]
        pooled = torch.bmm(weights.unsqueeze(1), emb).squeeze(1)
        if f.pooling == "mean":
            pooled = pooled / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return pooled


def _get(batch: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return batch[name]
    except KeyError:
        raise KeyError(f"batch has no column {name!r} (has {sorted(batch)})") from None
