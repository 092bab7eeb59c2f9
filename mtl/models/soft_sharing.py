"""Soft parameter sharing: per-task networks of identical shape tied by an L2 penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.features import FeatureSpec
from mtl.models.single_task import SingleTask
from mtl.precision import Precision


def pairwise_l2_penalty(stacked: Tensor) -> Tensor:
    """``sum_{i<j} ||W_i - W_j||^2`` over the members ``W_i = stacked[i]``.

    Computed from explicit pair differences, so the result is exactly ``0`` when all members
    are equal (no cancellation as in ``K * sum_i ||W_i - mean||^2``).
    """
    k = stacked.shape[0]
    if k < 2:
        return stacked.new_zeros(())
    flat = stacked.reshape(k, -1)
    i, j = torch.triu_indices(k, k, offset=1, device=stacked.device)
    diff = flat.index_select(0, i) - flat.index_select(0, j)
    return diff.pow(2).sum()


class SoftSharing(SingleTask):
    """K task networks of identical shape (no shared dense parameters) whose corresponding
    weights are pulled together by an L2 penalty.

    :meth:`regularization` returns
    ``strength * sum_layers sum_{i<j} ||W_i^(layer) - W_j^(layer)||_F^2`` — the pairwise form
    of Duong et al. (2015), who tie two parsers with ``||W_1 - W_2||^2``; for K tasks every
    pair is penalised (equivalently ``K * sum_i ||W_i - W_mean||^2``). It is exactly zero when
    all task networks are equal. Biases are included only with ``penalize_bias=True``.

    The penalty's gradient reaches every task's rows; only the task losses respect the row
    ownership of :meth:`task_parameter_owners`.

    Reference: Duong, Cohn, Bird, Cook, "Low Resource Dependency Parsing: Cross-lingual
    Parameter Sharing in a Neural Network Parser", ACL 2015.

    Args:
        spec: feature spec (``spec.tasks`` = K tasks).
        hidden: widths of each task network (ReLU after each) before its final logit.
        strength: penalty coefficient (``0`` = independent single-task networks).
        penalize_bias: also tie the biases.
        sparse_gradients: row-sparse embedding gradients.
        compute_dtype: body precision (:mod:`mtl.precision`), applied by ``forward``.

    Example:
        >>> import torch
        >>> from mtl.features import FeatureSpec, SparseFeature
        >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
        >>> m = SoftSharing(spec, hidden=[8], strength=0.01)
        >>> m({"u": torch.tensor([1, 2])}).shape, bool(m.regularization() > 0)
        (torch.Size([2, 2]), True)
    """

    def __init__(
        self,
        spec: FeatureSpec,
        hidden: list[int] | None = None,
        strength: float = 1e-3,
        penalize_bias: bool = False,
        sparse_gradients: bool = False,
        compute_dtype: Precision = None,
    ) -> None:
        if strength < 0:
            raise ValueError(f"soft_sharing: strength must be >= 0, got {strength}")
        super().__init__(spec, hidden=hidden, sparse_gradients=sparse_gradients, compute_dtype=compute_dtype)
        self.strength = float(strength)
        self.penalize_bias = penalize_bias

    def tied_parameters(self) -> list[nn.Parameter]:
        """The stacked ``[K, ...]`` parameters the penalty ties (weights, and biases if asked)."""
        params = list(self.towers.weights)
        if self.penalize_bias:
            params += list(self.towers.biases)
        return params

    def regularization(self) -> Tensor:
        total = sum(pairwise_l2_penalty(p) for p in self.tied_parameters())
        return self.strength * total  # type: ignore[return-value]
