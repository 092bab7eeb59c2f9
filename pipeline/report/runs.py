"""What the report reads of a training run in MLflow: its model and strategy, the final
validation metrics (and the oracle's on the same rows), the running losses, the gradient
diagnostics, the gate utilisation and the per-row validation predictions.

The names are those the trainer logs (:mod:`pipeline.train.ray_train`): params ``model``,
``strategy``; metrics ``final/valid/...`` (else the last ``valid/...``), ``oracle/...``,
``train/loss_<task>``; artifacts ``gradient_diagnostics.json``, ``routing_<name>.json``,
``valid_predictions.parquet``.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtl.metrics import WECHAT_ACTION_WEIGHTS
from pipeline.errors import UserError
from pipeline.report.predictions import Predictions, load_validation_predictions

SINGLE_TASK = "single_task"
GRADIENTS_ARTIFACT = "gradient_diagnostics.json"
_ROUTING = re.compile(r"^routing_(.+)\.json$")


class ReportError(UserError, ValueError):
    """A run the report cannot use: unknown id, no metrics, runs that do not fit together."""


@dataclass
class RunData:
    """One training run as the report sees it."""

    run_id: str
    name: str
    model: str
    strategy: str
    tasks: list[str]
    #: ``{"auc": {task: v}, "uauc": {task: v}, "score": v}`` of the model and of the oracle
    metrics: dict[str, Any]
    oracle: dict[str, Any] | None
    loss_history: list[dict[str, float]] = field(default_factory=list)
    gradients: dict[str, Any] | None = None
    routing: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: Predictions | None = None

    @property
    def label(self) -> str:
        """``model/strategy (run name)``: how the report names the run."""
        return f"{self.model}/{self.strategy} ({self.name})"

    @property
    def is_single_task(self) -> bool:
        return self.model == SINGLE_TASK


def load_run(client: Any, run_id: str, split: str = "valid") -> RunData:
    """Read one run (``client``: an ``mlflow.MlflowClient``)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ReportError(f"run {run_id!r}: not found in {client.tracking_uri} ({exc.message.splitlines()[0]})") from None
    metrics, params = run.data.metrics, run.data.params
    predictions = load_validation_predictions(client, run_id)
    tasks = predictions.tasks if predictions is not None else _tasks_of(metrics, split)
    if not tasks:
        raise ReportError(f"run {run_id} ({run.info.run_name}): no {split}/uauc_<task> metrics and no "
                          "validation predictions: not a training run?")
    model_metrics = _scores(metrics, tasks, [f"final/{split}", split])
    oracle = _scores(metrics, tasks, ["final/oracle", "oracle"])
    artifacts = [f.path for f in client.list_artifacts(run_id)]
    return RunData(
        run_id=run_id, name=run.info.run_name or run_id[:8], model=params.get("model", "?"),
        strategy=params.get("strategy", "?"), tasks=tasks, metrics=model_metrics,
        oracle=oracle if oracle["uauc"] else None,
        loss_history=_loss_history(client, run_id, tasks),
        gradients=_json(client, run_id, GRADIENTS_ARTIFACT) if GRADIENTS_ARTIFACT in artifacts else None,
        routing={m.group(1): np.asarray(_json(client, run_id, path)["mean"])
                 for path in artifacts if (m := _ROUTING.match(path))},
        predictions=predictions,
    )


def _tasks_of(metrics: dict[str, float], split: str) -> list[str]:
    """The tasks with a uAUC metric, official order first."""
    prefix = f"{split}/uauc_"
    found = {k[len(prefix):] for k in metrics if k.startswith(prefix)}
    order = [t for t in WECHAT_ACTION_WEIGHTS if t in found]
    return order + sorted(found - set(order))


def _scores(metrics: dict[str, float], tasks: list[str], prefixes: list[str]) -> dict[str, Any]:
    """Per-task AUC and uAUC and the score under the first prefix that has any."""
    for p in prefixes:
        uauc = {t: metrics[f"{p}/uauc_{t}"] for t in tasks if f"{p}/uauc_{t}" in metrics}
        if uauc:
            auc = {t: metrics[f"{p}/auc_{t}"] for t in tasks if f"{p}/auc_{t}" in metrics}
            return {"auc": auc, "uauc": uauc, "score": metrics.get(f"{p}/score")}
    return {"auc": {}, "uauc": {}, "score": None}


def _loss_history(client: Any, run_id: str, tasks: list[str]) -> list[dict[str, float]]:
    """``[{"step", "train/loss_<task>"...}]`` by step, from the metric histories."""
    by_step: dict[int, dict[str, float]] = {}
    for t in tasks:
        for m in client.get_metric_history(run_id, f"train/loss_{t}"):
            by_step.setdefault(int(m.step), {"step": int(m.step)})[f"train/loss_{t}"] = float(m.value)
    return [by_step[s] for s in sorted(by_step)]


def _json(client: Any, run_id: str, path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, path, d)).read_text())
