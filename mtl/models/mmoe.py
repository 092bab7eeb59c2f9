"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.base import Batch, MultiTaskModel
from mtl.models.layers import BatchedMLP, mix_experts, shared_input_linear, stacked_owners


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        num_experts: E shared experts.
        expert_hidden: expert MLP widths (ReLU after each); the last is the expert output width.
        tower_hidden: tower MLP widths before the final logit.
        sparse_gradients: row-sparse embedding gradients.

    Example:
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
        >>> MMoE(spec, num_experts=3)({"u": torch.tensor([1, 2])}).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        num_experts: int = 4,
        expert_hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
        sparse_gradients: bool = False,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients)
        expert_hidden = expert_hidden or [128, 64]
        tower_hidden = tower_hidden if tower_hidden is not None else [32]
        d, k = self.inputs.output_dim, self.num_tasks
        self.num_experts = num_experts
        self.experts = BatchedMLP(num_experts, d, expert_hidden, shared_input=True)
        # All K gates as one Linear(d, K*E); rows k*E:(k+1)*E belong to task k.
        self.gates = nn.Linear(d, k * num_experts)
        self.towers = BatchedMLP(k, expert_hidden[-1], tower_hidden, out_dim=1, shared_input=False)

    def routing_weights(self, batch: Batch) -> dict[str, Tensor]:
        return {"gate": self.gate_weights(self.inputs(batch))}

    def gate_weights(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        """Per-task distributions over experts, ``[B, K, E]``."""
        logits = shared_input_linear(x, self.gates.weight, self.gates.bias, task_grad_scale)
        return torch.softmax(logits.view(x.shape[0], self.num_tasks, self.num_experts), dim=-1)

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        experts = self.experts(x)  # [E, B, H]
        mixed = mix_experts(self.gate_weights(x, task_grad_scale), experts, task_grad_scale)  # [K, B, H]
        return self.towers(mixed).squeeze(-1).t()

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        gate_owner = torch.arange(self.num_tasks).repeat_interleave(self.num_experts)
        return [(self.gates.weight, gate_owner), (self.gates.bias, gate_owner)] + stacked_owners(self.towers)
