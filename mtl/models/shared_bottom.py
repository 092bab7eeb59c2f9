"""Shared-Bottom (hard parameter sharing): one shared bottom MLP, one tower per task."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.base import MultiTaskModel
from mtl.models.cross import expert_block
from mtl.models.layers import BatchedMLP, stacked_owners
from mtl.precision import Precision


class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: ``logit_k = tower_k(bottom(x))``.

    The bottom is shared by all tasks; the K towers are one :class:`BatchedMLP` reading the
    bottom output, and ``task_grad_scale`` scales task ``k``'s gradient where tower ``k`` reads
    it.

    Reference: Caruana, "Multitask Learning", Machine Learning 28, 1997 (hard sharing); the
    "Shared-Bottom" baseline of Ma et al., KDD 2018.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        bottom_hidden: shared bottom widths (ReLU after each); the last is the representation
            width the towers read.
        tower_hidden: tower widths before the final logit (``[]`` = a linear tower).
        sparse_gradients: row-sparse embedding gradients.
        compute_dtype: body precision (:mod:`mtl.precision`), applied by ``forward``.
        bottom_type: ``"mlp"`` or ``"cross"`` (DCN-v2 cross layers, then the ``bottom_hidden``
            MLP: :class:`~mtl.models.cross.BatchedCrossNet`).
        cross: cross bottom options (``layers``, ``rank``, ``mixtures``).
        dropout: dropout after each hidden layer of the bottom and towers in training mode
            (:class:`~mtl.models.layers.BatchedMLP`); 0 = off.

    Example:
        >>> import torch
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
        >>> SharedBottom(spec, bottom_hidden=[8], tower_hidden=[4])({"u": torch.tensor([1, 2])}).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        bottom_hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
        bottom_type: str = "mlp",
        cross: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        bottom_hidden = list(bottom_hidden) if bottom_hidden else [128, 64]
        tower_hidden = list(tower_hidden) if tower_hidden is not None else [32]
        self.bottom = expert_block(bottom_type, 1, self.inputs.output_dim, bottom_hidden, shared_input=True, cross=cross,
                                   dropout=dropout)
        self.towers = BatchedMLP(self.num_tasks, bottom_hidden[-1], tower_hidden, out_dim=1, shared_input=True,
                                 dropout=dropout)

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        h = self.bottom(x)[0]  # [B, H]
        return self.towers(h, task_grad_scale).squeeze(-1).t()

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The bottom's last layer (the towers read its output)."""
        return self.bottom.last_layer()

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        return stacked_owners(self.towers)
