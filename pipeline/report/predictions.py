"""Per-row validation predictions as an MLflow artifact (``valid_predictions.parquet``): what the
report's paired bootstrap needs and the run's metrics do not keep.

The layout is :class:`pipeline.valid_predictions.Predictions`' (the fusion search reads the same
files): ``user``, ``row`` (the source row, when known: runs are paired on it), ``prob_<task>``
and ``label_<task>`` per task, in the task order of the run.

Example:
    >>> # log_validation_predictions(logger, logger.run_id, probs, labels, users, spec.tasks, rows=rows)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.valid_predictions import Predictions

PREDICTIONS_ARTIFACT = "valid_predictions.parquet"


def log_validation_predictions(logger_or_client: Any, run_id: str, probs: np.ndarray, labels: np.ndarray,
                               users: np.ndarray, tasks: list[str], rows: np.ndarray | None = None) -> None:
    """Log ``valid_predictions.parquet`` to ``run_id`` (a later call replaces it).

    Args:
        logger_or_client: a :class:`pipeline.tracking.RunLogger` or an ``mlflow.MlflowClient``.
        probs, labels: ``[N, K]`` in the order of ``tasks``.
        users: ``[N]`` user ids.
        rows: ``[N]`` source row numbers (``_row``); lets the report pair runs by row rather
            than by position.
    """
    client = getattr(logger_or_client, "client", logger_or_client)
    with tempfile.TemporaryDirectory() as d:
        path = Predictions(list(tasks), probs, labels, users, rows).save(Path(d) / PREDICTIONS_ARTIFACT)
        client.log_artifact(run_id, str(path))


def load_validation_predictions(client: Any, run_id: str) -> Predictions | None:
    """The run's ``valid_predictions.parquet``, or None when it has none."""
    if not any(f.path == PREDICTIONS_ARTIFACT for f in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, d)
        return Predictions.from_table(pq.read_table(path), f"run {run_id}: {PREDICTIONS_ARTIFACT}")
