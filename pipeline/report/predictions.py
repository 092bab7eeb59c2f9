"""Per-row validation predictions as an MLflow artifact (``valid_predictions.parquet``): what the
report's paired bootstrap needs and the run's metrics do not keep.

Columns: ``user`` (int64), ``row`` (int64 source row, when known: runs are paired on it),
``prob_<task>`` (float64) and ``label_<task>`` (float64, NaN where unlabelled) per task, in the
task order of the run.

Example:
    >>> # log_validation_predictions(logger, logger.run_id, probs, labels, users, spec.tasks, rows=rows)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PREDICTIONS_ARTIFACT = "valid_predictions.parquet"


@dataclass
class Predictions:
    """One run's validation predictions: ``probs``/``labels`` ``[N, K]`` over ``tasks``."""

    tasks: list[str]
    probs: np.ndarray
    labels: np.ndarray
    users: np.ndarray
    rows: np.ndarray | None = None

    def to_table(self) -> pa.Table:
        n, k = len(self.users), len(self.tasks)
        probs, labels = np.asarray(self.probs).reshape(n, k), np.asarray(self.labels).reshape(n, k)
        columns: dict[str, Any] = {"user": np.asarray(self.users, dtype=np.int64)}
        if self.rows is not None:
            columns["row"] = np.asarray(self.rows, dtype=np.int64)
        for i, task in enumerate(self.tasks):
            columns[f"prob_{task}"] = probs[:, i].astype(np.float64)
            columns[f"label_{task}"] = labels[:, i].astype(np.float64)
        return pa.table(columns)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Predictions":
        names = table.column_names
        tasks = [c[len("prob_"):] for c in names if c.startswith("prob_")]
        missing = [f"label_{t}" for t in tasks if f"label_{t}" not in names] + [c for c in ("user",) if c not in names]
        if missing:
            raise ValueError(f"{PREDICTIONS_ARTIFACT}: missing columns {missing}")
        col = lambda name: table.column(name).to_numpy()  # noqa: E731
        return cls(tasks=tasks, probs=np.stack([col(f"prob_{t}") for t in tasks], axis=1),
                   labels=np.stack([col(f"label_{t}") for t in tasks], axis=1), users=col("user"),
                   rows=col("row") if "row" in names else None)

    def task(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, labels)`` of one task."""
        k = self.tasks.index(task)
        return self.probs[:, k], self.labels[:, k]


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
    table = Predictions(list(tasks), probs, labels, users, rows).to_table()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / PREDICTIONS_ARTIFACT
        pq.write_table(table, path)
        client.log_artifact(run_id, str(path))


def load_validation_predictions(client: Any, run_id: str) -> Predictions | None:
    """The run's ``valid_predictions.parquet``, or None when it has none."""
    if not any(f.path == PREDICTIONS_ARTIFACT for f in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, d)
        return Predictions.from_table(pq.read_table(path))
