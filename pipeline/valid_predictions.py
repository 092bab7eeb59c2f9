"""Per-row validation predictions: one dataclass and one Parquet layout for the fusion search
(``python -m pipeline fuse``), the Tune search's best trial (``<out>/predictions/valid.parquet``)
and the report's paired bootstrap (a training run's ``valid_predictions.parquet`` artifact).

Columns: ``user`` (int64), ``row`` (int64 source row, when known: runs are paired on it),
``prob_<task>`` (float64) and ``label_<task>`` (float64, NaN where unlabelled) per task, in
task order. Files in the fusion search's earlier layout (``_user``, ``_row``, ``p_<task>``,
``y_<task>``) are read too.

Example:
    >>> # Predictions(spec.tasks, probs, labels, users, rows).save("valid.parquet")
    >>> # Predictions.load("valid.parquet").task("like")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError

#: (user, row, probability prefix, label prefix): the layout written, then the earlier one read
LAYOUTS = (("user", "row", "prob_", "label_"), ("_user", "_row", "p_", "y_"))


@dataclass
class Predictions:
    """Validation predictions: ``probs``/``labels`` ``[N, K]`` over ``tasks``, ``users`` ``[N]``,
    ``rows`` ``[N]`` (source rows, optional)."""

    tasks: list[str]
    probs: np.ndarray
    labels: np.ndarray
    users: np.ndarray
    rows: np.ndarray | None = None

    def to_table(self) -> pa.Table:
        """The Parquet layout (see the module docstring)."""
        user, row, prob, label = LAYOUTS[0]
        n, k = len(self.users), len(self.tasks)
        probs, labels = np.asarray(self.probs).reshape(n, k), np.asarray(self.labels).reshape(n, k)
        columns: dict[str, Any] = {user: np.asarray(self.users, dtype=np.int64)}
        if self.rows is not None:
            columns[row] = np.asarray(self.rows, dtype=np.int64)
        for i, task in enumerate(self.tasks):
            columns[f"{prob}{task}"] = probs[:, i].astype(np.float64)
            columns[f"{label}{task}"] = labels[:, i].astype(np.float64)
        return pa.table(columns)

    @classmethod
    def from_table(cls, table: pa.Table, source: str = "predictions") -> "Predictions":
        """Read :meth:`to_table`'s layout (or the earlier one).

        Args:
            table: the columns; source: the file or artifact, named in errors.

        Raises:
            DataError: no probability column, or a task's label (or the user column) missing.
        """
        names = table.column_names
        user, row, prob, label = next((lay for lay in LAYOUTS if any(c.startswith(lay[2]) for c in names)), LAYOUTS[0])
        tasks = [c[len(prob):] for c in names if c.startswith(prob)]
        missing = [f"{label}{t}" for t in tasks if f"{label}{t}" not in names] + ([] if user in names else [user])
        if not tasks or missing:
            raise DataError(f"{source}: predictions need {user} and {prob}<task>/{label}<task> columns; "
                            f"has {names}, missing {missing or [f'{prob}<task>']}")
        col = lambda name: table.column(name).to_numpy()  # noqa: E731
        return cls(tasks=tasks, probs=np.stack([col(f"{prob}{t}") for t in tasks], axis=1).astype(np.float64),
                   labels=np.stack([col(f"{label}{t}") for t in tasks], axis=1).astype(np.float64), users=col(user),
                   rows=col(row) if row in names else None)

    def task(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, labels)`` of one task."""
        k = self.tasks.index(task)
        return self.probs[:, k], self.labels[:, k]

    def save(self, path: str | Path) -> Path:
        """Write the Parquet file (parent folders created).

        Args:
            path: the file.
        """
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_table(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Predictions":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.

        Raises:
            DataError: no such file, or columns missing (named).
        """
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: predictions file not found")
        return cls.from_table(pq.read_table(path), str(path))
