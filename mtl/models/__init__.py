"""Architectures: one file each, one registry (:data:`MODELS`), one interface
(:class:`mtl.models.base.MultiTaskModel`).

Example:
    >>> from mtl.features import FeatureSpec, SparseFeature
    >>> spec = FeatureSpec(sparse=[SparseFeature("u", 100)], tasks=["a", "b"])
    >>> build_model("mmoe", spec, num_experts=2).num_tasks
    2
"""

from __future__ import annotations

from typing import Any

from mtl.features import FeatureSpec
from mtl.models.base import MultiTaskModel
from mtl.models.mmoe import MMoE
from mtl.models.ple import PLE
from mtl.models.shared_bottom import SharedBottom
from mtl.models.single_task import SingleTask
from mtl.models.snr import SNR
from mtl.models.soft_sharing import SoftSharing

MODELS: dict[str, type[MultiTaskModel]] = {
    "mmoe": MMoE,
    "ple": PLE,
    "shared_bottom": SharedBottom,
    "single_task": SingleTask,
    "snr": SNR,
    "soft_sharing": SoftSharing,
}


def build_model(name: str, spec: FeatureSpec, **kwargs: Any) -> MultiTaskModel:
    """Construct a registered architecture by name with its keyword arguments."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    return cls(spec, **kwargs)


__all__ = ["MODELS", "MultiTaskModel", "build_model"]
