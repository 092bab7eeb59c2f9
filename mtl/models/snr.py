"""SNR: Sub-Network Routing (Ma et al., AAAI 2019), variants SNR-Trans and SNR-Aver.

The shared bottom is split into ``E`` parallel lower sub-networks (shared by all tasks) with
outputs ``u_1..u_E``. Each task ``j`` has an upper sub-network whose input is routed from the
lower ones through binary coding variables ``z_ij``:

- SNR-Trans: ``v_j = sum_i z_ij * W_ij u_i`` (a transformation matrix per connection),
- SNR-Aver:  ``v_j = sum_i z_ij * u_i`` (the paper's "weighted average"; not renormalised).

``z`` follows the hard-concrete distribution of Louizos et al. (ICLR 2018) with learnable
``log_alpha``: ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``s_bar = s * (zeta - gamma) + gamma``, ``z = min(1, max(0, s_bar))``. The L0 penalty is the
expected number of open connections, ``sum sigmoid(log_alpha - beta * log(-gamma / zeta))``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.base import Batch, MultiTaskModel
from mtl.models.layers import BatchedMLP, mix_experts, shared_input_linear, stacked_owners
from mtl.precision import Precision


def hard_concrete_sample(log_alpha: Tensor, beta: float, gamma: float, zeta: float, eps: float = 1e-6) -> Tensor:
    """One reparameterised hard-concrete sample per entry of ``log_alpha`` (torch's global RNG)."""
    u = torch.rand_like(log_alpha).clamp(eps, 1.0 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_eval(log_alpha: Tensor, gamma: float, zeta: float) -> Tensor:
    """Deterministic, exactly binary gate for evaluation: ``1[s_bar_det > 0.5]`` with the
    noise-free stretched gate ``s_bar_det = sigmoid(log_alpha) * (zeta - gamma) + gamma``.
    (Louizos et al.'s test-time estimate is ``min(1, max(0, s_bar_det))``, which can lie
    strictly between 0 and 1; rounding it at 0.5 makes the routing a true on/off structure.
    With the default symmetric ``gamma = -0.1, zeta = 1.1`` this is ``log_alpha > 0``.)"""
    s_bar = torch.sigmoid(log_alpha) * (zeta - gamma) + gamma
    return (s_bar > 0.5).to(log_alpha.dtype)


def hard_concrete_open_probability(log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (Louizos et al., eq. 12)."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


class SNR(MultiTaskModel):
    """Sub-Network Routing with learnable binary connections between sub-network layers.

    What is shared: the ``num_lower`` lower sub-networks (read by every task through its
    routing). Task-specific: task ``j``'s coding variables ``log_alpha[j]``, transformation
    matrices ``W[j]`` (SNR-Trans) and upper sub-network (upper MLP + logit). Coding variables
    are sampled once per forward call (shared by the batch) in training mode and are exactly
    0/1 and deterministic in eval mode (:func:`hard_concrete_eval`).

    ``task_grad_scale`` scales task ``j``'s gradient where its routing reads the lower
    sub-network outputs.

    Reference: Ma, Zhao, Chen, Li, Hong, Chi, "SNR: Sub-Network Routing for Flexible Parameter
    Sharing in Multi-Task Learning", AAAI 2019; hard concrete / L0: Louizos, Welling, Kingma,
    "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        variant: ``"trans"`` (SNR-Trans) or ``"aver"`` (SNR-Aver).
        num_lower: number of lower sub-networks ``E``.
        lower_hidden: lower sub-network widths (ReLU after each); the last is ``u_i``'s width.
        trans_dim: width of ``v_j`` for SNR-Trans (default: ``lower_hidden[-1]``); SNR-Aver's
            ``v_j`` has the lower output width.
        upper_hidden: upper sub-network widths before the final logit.
        l0_strength: coefficient of the L0 penalty in :meth:`regularization`.
        init_log_alpha: mean of the initial ``log_alpha`` (init ``N(mean, 0.01^2)``; the
            default 1.0 opens ~93% of sampled connections and all eval connections).
        beta, gamma, zeta: hard-concrete temperature and stretch interval.
        sparse_gradients: row-sparse embedding gradients.
        compute_dtype: body precision (:mod:`mtl.precision`), applied by ``forward``.

    Example:
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
        >>> m = SNR(spec, variant="aver", num_lower=3, lower_hidden=[8], upper_hidden=[4]).eval()
        >>> m({"u": torch.tensor([1, 2])}).shape, sorted(m.coding_variables().unique().tolist())
        (torch.Size([2, 2]), [1.0])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        variant: Literal["trans", "aver"] = "trans",
        num_lower: int = 4,
        lower_hidden: list[int] | None = None,
        trans_dim: int | None = None,
        upper_hidden: list[int] | None = None,
        l0_strength: float = 1e-3,
        init_log_alpha: float = 1.0,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        if variant not in ("trans", "aver"):
            raise ValueError(f"snr: variant must be 'trans' or 'aver', got {variant!r}")
        if num_lower < 1:
            raise ValueError(f"snr: num_lower must be >= 1, got {num_lower}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"snr: need gamma < 0 < 1 < zeta and beta > 0, got {gamma=}, {zeta=}, {beta=}")
        lower_hidden = list(lower_hidden) if lower_hidden else [128, 64]
        upper_hidden = list(upper_hidden) if upper_hidden is not None else [32]
        k, d, h = self.num_tasks, self.inputs.output_dim, lower_hidden[-1]
        self.variant = variant
        self.num_lower = num_lower
        self.lower_dim = h
        self.l0_strength = float(l0_strength)
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.lower = BatchedMLP(num_lower, d, lower_hidden, shared_input=True)
        self.log_alpha = nn.Parameter(torch.empty(k, num_lower).normal_(init_log_alpha, 0.01))
        if variant == "trans":
            v_dim = trans_dim or h
            bound = 1.0 / math.sqrt(num_lower * h)
            # W[j] = [W_1j | ... | W_Ej] as one [v_dim, E*h] block: v_j = W[j] @ concat_i(z_ij u_i).
            self.trans = nn.Parameter(torch.empty(k, v_dim, num_lower * h).uniform_(-bound, bound))
            self.register_buffer("_zero_bias", torch.zeros(k * v_dim), persistent=False)
        else:
            v_dim = h
        self.upper = BatchedMLP(k, v_dim, upper_hidden, out_dim=1, shared_input=False)

    def coding_variables(self) -> Tensor:
        """``z`` ``[K, E]`` (task ``j`` reads lower sub-network ``i`` with weight ``z[j, i]``): a
        fresh hard-concrete sample in training mode, the exact 0/1 eval gate otherwise."""
        if self.training:
            return hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta)
        return hard_concrete_eval(self.log_alpha, self.gamma, self.zeta)

    def open_probability(self) -> Tensor:
        """``P(z_ij != 0)`` ``[K, E]``."""
        return hard_concrete_open_probability(self.log_alpha, self.beta, self.gamma, self.zeta)

    def routing_weights(self, batch: Batch) -> dict[str, Tensor]:
        """``{"z": [B, K, E] eval-mode 0/1 connections, "open_prob": [B, K, E] P(z != 0)}``."""
        b = batch[self.spec.all_features()[0].name].shape[0]
        z = hard_concrete_eval(self.log_alpha, self.gamma, self.zeta).detach()
        p = self.open_probability().detach()
        return {"z": z.expand(b, -1, -1), "open_prob": p.expand(b, -1, -1)}

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        lower = self.lower(x)  # [E, B, h]
        z = self.coding_variables()  # [K, E]
        k, e, b = self.num_tasks, self.num_lower, x.shape[0]
        if self.variant == "trans":
            u_cat = lower.transpose(0, 1).reshape(b, e * self.lower_dim)  # [B, E*h]
            z_cols = z.repeat_interleave(self.lower_dim, dim=1).unsqueeze(1)  # [K, 1, E*h]
            weight = (self.trans * z_cols).reshape(-1, e * self.lower_dim)  # [K*v, E*h]
            v = shared_input_linear(u_cat, weight, self._zero_bias, task_grad_scale)  # [B, K*v]
            v = v.view(b, k, -1).transpose(0, 1)  # [K, B, v]
        else:
            v = mix_experts(z.unsqueeze(0).expand(b, k, e), lower, task_grad_scale)  # [K, B, h]
        return self.upper(v).squeeze(-1).t()

    def regularization(self) -> Tensor:
        return self.l0_strength * self.open_probability().sum()

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.lower.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The lower sub-networks' last layer (the routing reads its output)."""
        return self.lower.last_layer()

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        owner = torch.arange(self.num_tasks)
        pairs: list[tuple[nn.Parameter, Tensor]] = [(self.log_alpha, owner)]
        if self.variant == "trans":
            pairs.append((self.trans, owner))
        return pairs + stacked_owners(self.upper)
