"""DCN-v2 cross networks as a batched expert / bottom block (Wang, Shivanna, Cheng, Jain, Lin,
Hong, Chi, "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning
to Rank Systems", WWW 2021).

A cross layer (paper eq. 1): ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (``*`` elementwise).
Low rank (paper sec. 5.1, ``W = U V^T``): ``x_{l+1} = x_0 * (U_l V_l^T x_l + b_l) + x_l``.
Mixture of low-rank experts (DCN-Mix, paper eq. 4-5):
``x_{l+1} = sum_i G_i(x_l) x_0 * (U_i g(C_i g(V_i^T x_l)) + b_l) + x_l`` with ``g = tanh`` and
``G = softmax`` of a linear gate over the ``M`` low-rank experts.

:class:`BatchedCrossNet` stacks ``num_members`` such networks (experts, or one bottom) on a
leading axis like :class:`~mtl.models.layers.BatchedMLP`, followed by an optional batched MLP
(DCN-v2's "stacked" structure), so it drops in wherever a ``BatchedMLP`` of experts is used,
``member_scale`` (``task_grad_scale``) included.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mtl.models.grad_scale import Scale, scale_grad
from mtl.models.layers import BatchedMLP


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class BatchedCrossNet(nn.Module):
    """``num_members`` DCN-v2 cross networks of ``layers`` cross layers each, then an optional
    batched MLP (``hidden``, ReLU after each).

    Args:
        num_members: how many networks (experts; 1 for a bottom).
        in_dim: input width ``d`` (the cross layers keep it).
        hidden: MLP widths after the cross layers; ``[]`` = the cross output (width ``d``).
        layers: cross layers per network.
        rank: ``None`` = full-rank ``W`` (``d x d``); an int = low-rank ``U V^T``.
        mixtures: low-rank experts per layer (``> 1`` = DCN-Mix; needs ``rank``).
        shared_input: the input is one ``[B, d]`` tensor read by every member; otherwise
            ``[num_members, B, d]``.
        dropout: dropout after each hidden layer of the MLP (:class:`BatchedMLP`).

    Every parameter has ``num_members`` on dim 0 (member ``m``'s slice is its own network).
    Returns ``[num_members, B, width]`` from :meth:`forward`.

    Example:
        >>> net = BatchedCrossNet(3, 10, [8], layers=2, rank=4, mixtures=2)
        >>> net(torch.randn(5, 10)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        num_members: int,
        in_dim: int,
        hidden: list[int],
        layers: int = 2,
        rank: int | None = None,
        mixtures: int = 1,
        shared_input: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"cross network: layers must be >= 1, got {layers}")
        if mixtures < 1 or (mixtures > 1 and rank is None):
            raise ValueError(f"cross network: mixtures={mixtures} needs mixtures >= 1, and a rank when > 1")
        if rank is not None and rank < 1:
            raise ValueError(f"cross network: rank must be >= 1, got {rank}")
        n, d = num_members, in_dim
        self.num_members, self.in_dim, self.shared_input = n, d, shared_input
        self.num_layers, self.rank, self.mixtures = layers, rank, mixtures
        self.cross = nn.ModuleList()
        for _ in range(layers):
            layer = nn.ParameterDict({"bias": nn.Parameter(torch.zeros(n, 1, d))})
            if rank is None:
                layer["weight"] = _uniform(n, d, d, fan_in=d)  # [n, in, out]
            else:
                m = mixtures
                layer["v"] = _uniform(n, m, d, rank, fan_in=d)
                layer["u"] = _uniform(n, m, rank, d, fan_in=rank)
                if m > 1:
                    layer["c"] = _uniform(n, m, rank, rank, fan_in=rank)
                    layer["gate"] = _uniform(n, d, m, fan_in=d)
            self.cross.append(layer)
        self.mlp = BatchedMLP(n, d, hidden, shared_input=False, dropout=dropout) if hidden else None
        self.out_width = hidden[-1] if hidden else d

    def last_layer(self) -> list[nn.Parameter]:
        """The parameters of the last layer (the MLP's last, else the last cross layer)."""
        if self.mlp is not None:
            return self.mlp.last_layer()
        return list(self.cross[-1].values())

    def forward(self, x: Tensor, member_scale: Scale | None = None) -> Tensor:
        """Args:
        x: ``[B, d]`` (shared input) or ``[num_members, B, d]``.
        member_scale: ``[num_members]``: member ``m``'s gradient into ``x`` is multiplied by
            ``member_scale[m]`` (``task_grad_scale``); ``None`` = 1.
        """
        n = self.num_members
        x0 = x.unsqueeze(0).expand(n, *x.shape) if x.dim() == 2 else x  # [n, B, d]
        if member_scale is not None:
            x0 = scale_grad(x0, member_scale.view(n, 1, 1))
        h = x0
        for layer in self.cross:
            h = x0 * (self._transform(layer, h) + layer["bias"]) + h
        return self.mlp(h) if self.mlp is not None else h

    def _transform(self, layer: nn.ParameterDict, h: Tensor) -> Tensor:
        """``W x_l`` (full rank), ``U V^T x_l`` (low rank) or the gated mixture of
        ``U_i tanh(C_i tanh(V_i^T x_l))`` (DCN-Mix), ``[n, B, d]``; the bias and ``x_0 *`` are
        applied by the caller (in the mixture, the gate weights sum to 1, so
        ``sum_i G_i x_0 * (E_i + b) = x_0 * (sum_i G_i E_i + b)``)."""
        if self.rank is None:
            return torch.bmm(h, layer["weight"])
        low = torch.einsum("nbd,nmdr->nmbr", h, layer["v"])  # [n, M, B, r]
        if self.mixtures == 1:
            return torch.einsum("nmbr,nmrd->nbd", low, layer["u"])
        low = torch.tanh(torch.einsum("nmbr,nmrs->nmbs", torch.tanh(low), layer["c"]))
        experts = torch.einsum("nmbr,nmrd->nmbd", low, layer["u"])  # [n, M, B, d]
        gates = torch.softmax(torch.bmm(h, layer["gate"]), dim=-1)  # [n, B, M]
        return torch.einsum("nbm,nmbd->nbd", gates, experts)


def expert_block(
    kind: str,
    num_members: int,
    in_dim: int,
    hidden: list[int],
    shared_input: bool = True,
    cross: dict[str, Any] | None = None,
    dropout: float = 0.0,
) -> BatchedMLP | BatchedCrossNet:
    """The experts (or bottom) of an architecture: ``"mlp"`` (:class:`BatchedMLP`) or
    ``"cross"`` (:class:`BatchedCrossNet`, options ``layers``, ``rank``, ``mixtures`` from
    ``cross``); both return ``[num_members, B, hidden[-1]]``, with ``dropout`` after each
    hidden MLP layer in training mode.

    Raises:
        ValueError: an unknown kind, or cross options given to ``"mlp"``.
    """
    if kind == "mlp":
        if cross:
            raise ValueError(f"cross options {sorted(cross)} given to MLP experts; set the expert type to 'cross'")
        return BatchedMLP(num_members, in_dim, hidden, shared_input=shared_input, dropout=dropout)
    if kind == "cross":
        unknown = sorted(set(cross or {}) - {"layers", "rank", "mixtures"})
        if unknown:
            raise ValueError(f"cross options {unknown} unknown; accepted: ['layers', 'mixtures', 'rank']")
        return BatchedCrossNet(num_members, in_dim, hidden, shared_input=shared_input, dropout=dropout, **(cross or {}))
    raise ValueError(f"expert type {kind!r} unknown; choose from {EXPERT_TYPES}")


EXPERT_TYPES = ("mlp", "cross")
