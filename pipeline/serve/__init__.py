"""Serving: the scorer (raw rows -> probabilities + fused score), its MLflow pyfunc and the
registry with the champion promotion rule (:mod:`.registry`, imported on demand: MLflow)."""

from pipeline.serve.scorer import SCORE, RequestError, Scorer, default_fusion_weights, write_model_dir

__all__ = ["SCORE", "RequestError", "Scorer", "default_fusion_weights", "write_model_dir"]
