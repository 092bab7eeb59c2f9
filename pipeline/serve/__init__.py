"""Serving: the scorer (raw rows -> probabilities + fused score), its MLflow pyfunc and the
registry with the champion promotion rule (:mod:`.registry`, imported on demand: MLflow).

The scorer's names are imported on first use (PEP 562): a stage that needs only the registry's
argument helpers (``python -m pipeline predict``) does not pay torch's import before it starts
Ray, and batch scoring imports it in a thread while Ray starts."""

from __future__ import annotations

from typing import Any

BUNDLE = "bundle"  # the pyfunc's artifact key of the scorer's folder (artifacts/bundle/)

__all__ = ["SCORE", "RequestError", "Scorer", "default_fusion_weights", "write_model_dir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline.serve import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
