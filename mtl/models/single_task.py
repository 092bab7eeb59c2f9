"""Single-task baseline: K independent networks that share only the embedding tables."""

from __future__ import annotations

from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.base import MultiTaskModel
from mtl.models.layers import BatchedMLP, stacked_owners
from mtl.precision import Precision


class SingleTask(MultiTaskModel):
    """K independent MLPs (one per task) on the shared input representation.

    The only parameters several tasks reach are the embedding tables (the input module), so
    :meth:`shared_parameters` is empty. The K MLPs are one :class:`BatchedMLP` (one GEMM per
    layer for all tasks); ``task_grad_scale`` scales task ``k``'s gradient into the shared
    input representation (hence into the embeddings).

    Reference: the usual "one model per task" baseline of multi-task papers (e.g. Ma et al.,
    KDD 2018, MMoE; Tang et al., RecSys 2020, PLE), here with shared embeddings.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        hidden: MLP widths (ReLU after each) before each task's final logit.
        sparse_gradients: row-sparse embedding gradients.
        compute_dtype: body precision (:mod:`mtl.precision`), applied by ``forward``.
        dropout: dropout after each hidden layer in training mode
            (:class:`~mtl.models.layers.BatchedMLP`); 0 = off.

    Example:
        >>> import torch
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b", "c"])
        >>> SingleTask(spec, hidden=[8])({"u": torch.tensor([1, 2])}).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        hidden: list[int] | None = None,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        hidden = list(hidden) if hidden is not None else [128, 64]
        self.towers = BatchedMLP(self.num_tasks, self.inputs.output_dim, hidden, out_dim=1, shared_input=True,
                                 dropout=dropout)

    def forward_representation(self, x: Tensor, task_grad_scale: Tensor | None = None) -> Tensor:
        return self.towers(x, task_grad_scale).squeeze(-1).t()

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return []

    def task_parameter_owners(self) -> list[tuple[nn.Parameter, Tensor]]:
        return stacked_owners(self.towers)
