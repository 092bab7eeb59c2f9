"""Numeric features as embeddings (Gorishniy, Rubachev, Babenko, "On Embeddings for Numerical
Features in Tabular Deep Learning", NeurIPS 2022).

One :class:`NumericEmbedding` per dense feature with an :class:`~mtl.features.NumericEncoding`;
its ``dim`` components are encoded independently (each with its own parameters, batched) and
concatenated: ``[B, dim] -> [B, dim * encoding.dim]``.

- ``bucket``: the component's quantile bin (edges fitted on training rows) indexes an
  embedding table of ``bins + 2`` rows: row ``r`` = the number of edges strictly below the value
  (0 at or below the smallest training value, ``bins + 1`` above the largest); the same ids as
  :meth:`pipeline.transforms.buckets.QuantileBoundaries.transform`.
- ``piecewise_linear`` (PLE, paper eq. 2): bins ``[b_{t-1}, b_t)``, ``t = 1..T``;
  ``e_t = 0`` if ``x < b_{t-1}`` and ``t > 1``, ``1`` if ``x >= b_t`` and ``t < T``, otherwise
  ``(x - b_{t-1}) / (b_t - b_{t-1})`` (the first and last bins extrapolate linearly); a bin of
  zero width (a repeated quantile) is the step ``x >= b_t``. Then ``ReLU(Linear(e))`` ("Q-LR").
- ``periodic`` (PLR, paper eq. 8): ``v = [sin(2 pi c x), cos(2 pi c x)]`` with learned
  ``c ~ N(0, sigma^2)`` of size ``frequencies``, then ``ReLU(Linear(v))``.

Example:
    >>> from mtl.features import DenseFeature, NumericEncoding
    >>> f = DenseFeature("age", boundaries=[[0.0, 1.0, 2.0]], encoding=NumericEncoding("piecewise_linear", dim=4))
    >>> NumericEmbedding(f)(torch.tensor([[0.5], [3.0]])).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtl.features import DenseFeature


def piecewise_linear_encoding(x: Tensor, edges: Tensor) -> Tensor:
    """PLE of ``x`` ``[B, C]`` over per-component edges ``[C, T + 1]``: ``[B, C, T]``."""
    lo, hi = edges[:, :-1], edges[:, 1:]  # [C, T]
    width = hi - lo
    xb = x.unsqueeze(-1)  # [B, C, 1]
    ratio = (xb - lo) / torch.where(width > 0, width, torch.ones_like(width))
    t = width.shape[1]
    # Clamp below except for the first bin, above except for the last (linear extrapolation).
    lower = torch.zeros(t, dtype=x.dtype, device=x.device)
    upper = torch.ones(t, dtype=x.dtype, device=x.device)
    lower[0], upper[-1] = -math.inf, math.inf
    enc = torch.maximum(torch.minimum(ratio, upper), lower)
    step = (xb >= hi).to(x.dtype)
    return torch.where(width > 0, enc, step)


class NumericEmbedding(nn.Module):
    """The embedding of one dense feature's components (see the module docstring).

    Args:
        feature: a :class:`~mtl.features.DenseFeature` with ``encoding`` set (and
            ``boundaries`` for ``bucket`` / ``piecewise_linear``).
    """

    def __init__(self, feature: DenseFeature) -> None:
        super().__init__()
        enc = feature.encoding
        if enc is None:
            raise ValueError(f"feature {feature.name!r} has no numeric encoding")
        self.kind, self.components, self.out_dim = enc.kind, feature.dim, enc.dim
        c = feature.dim
        if enc.needs_boundaries:
            assert feature.boundaries is not None  # checked by DenseFeature
            widths = {len(b) for b in feature.boundaries}
            if len(widths) != 1:
                raise ValueError(f"feature {feature.name!r}: every component needs the same number of edges")
            self.register_buffer("edges", torch.tensor(feature.boundaries, dtype=torch.float32))  # [C, T+1]
        n_edges = self.edges.shape[1] if enc.needs_boundaries else 0
        if enc.kind == "bucket":
            rows = n_edges + 1  # below the first edge, between edges, above the last
            self.table = nn.Parameter(torch.randn(c, rows, enc.dim) * 0.3)  # as the id tables
            self.register_buffer("row_offset", torch.arange(c) * rows)
            return
        if enc.kind == "piecewise_linear":
            fan_in = n_edges - 1
        else:
            self.frequencies = nn.Parameter(torch.randn(c, enc.frequencies) * enc.sigma)
            fan_in = 2 * enc.frequencies
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(c, fan_in, enc.dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(c, enc.dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B]`` or ``[B, C]`` -> ``[B, C * dim]``."""
        x = x.reshape(x.shape[0], self.components)
        if self.kind == "bucket":
            # bucketize per component: count of edges strictly below x
            rows = (x.unsqueeze(-1) > self.edges.to(x.dtype)).sum(-1) + self.row_offset  # [B, C]
            return self.table.reshape(-1, self.out_dim)[rows].reshape(x.shape[0], -1)
        if self.kind == "piecewise_linear":
            feats = piecewise_linear_encoding(x, self.edges.to(x.dtype))  # [B, C, T]
        else:
            angle = 2 * math.pi * x.unsqueeze(-1) * self.frequencies  # [B, C, F]
            feats = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
        out = torch.einsum("bct,ctd->bcd", feats, self.weight) + self.bias
        return torch.relu(out).reshape(x.shape[0], -1)
