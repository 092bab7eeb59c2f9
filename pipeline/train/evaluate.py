"""Prediction on any device and the official scores: per-task AUC, per-user AUC (uAUC), log
loss and the challenge's weighted score (:mod:`mtl.metrics`), beside the oracle's score on the
same rows when the data came from the generator.

Example:
    >>> # probs, labels, meta = predict_batches(model, iter_local_batches(d, "valid", 32768))
    >>> # score_predictions(probs, labels, meta["_user"], spec.tasks, "valid")["valid/score"]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mtl.device import host_to_device
from mtl.features import FeatureSpec
from mtl.metrics import WECHAT_ACTION_WEIGHTS, auc, user_auc, weighted_score
from mtl.models import MultiTaskModel
from pipeline.data import Batch, iter_local_batches


@torch.no_grad()
def predict_batches(model: MultiTaskModel, batches: Iterable[Batch],
                    device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Probabilities ``[N, K]`` (float64), labels ``[N, K]`` (or None) and meta columns of the
    batches, in order. Runs on the model's device; results come back to the host."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, labels, meta = [], [], {}
    try:
        for batch in batches:
            feats = {k: host_to_device(v, device) for k, v in batch.features.items()}
            probs.append(torch.sigmoid(model(feats).float()).double().cpu().numpy())
            if batch.labels is not None:
                labels.append(batch.labels.cpu().numpy())
            for k, v in batch.meta.items():
                meta.setdefault(k, []).append(v.cpu().numpy())
    finally:
        model.train(was_training)
    k = getattr(model, "num_tasks", 0)
    return (
        np.concatenate(probs) if probs else np.zeros((0, k)),
        np.concatenate(labels) if labels else None,
        {name: np.concatenate(v) for name, v in meta.items()},
    )


def predict(model: MultiTaskModel, data_dir: str | Path, split: str, spec: FeatureSpec,
            batch_size: int = 32768) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """:func:`predict_batches` over a preprocessed split read locally."""
    return predict_batches(model, iter_local_batches(data_dir, split, batch_size, spec=spec))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def score_predictions(probs: np.ndarray, labels: np.ndarray, users: np.ndarray | None,
                      tasks: list[str], prefix: str, mask: np.ndarray | None = None) -> dict[str, float]:
    """Per-task AUC, log loss and (with users) uAUC, the mean AUC over tasks, and the weighted score: the official
    weights (4, 3, 2, 1, 1, 1, 1) when every task is a WeChat action, equal weights otherwise.

    Args:
        mask: ``[N, K]`` rows that count per task (down-sampling masks); all rows by default.
    """
    metrics: dict[str, float] = {}
    uaucs: dict[str, float] = {}
    for k, task in enumerate(tasks):
        rows = slice(None) if mask is None else mask[:, k] > 0
        y, p = labels[rows, k], probs[rows, k]
        if len(y) == 0:
            continue
        metrics[f"{prefix}/logloss_{task}"] = log_loss(y, p)
        if 0 < y.sum() < len(y):
            metrics[f"{prefix}/auc_{task}"] = auc(y, p)
        if users is not None:
            u = user_auc(y, p, users[rows])
            if not math.isnan(u):
                uaucs[task] = metrics[f"{prefix}/uauc_{task}"] = u
    aucs = [v for k, v in metrics.items() if k.startswith(f"{prefix}/auc_")]
    if aucs:  # an early-stopping score for data without users (issue 14)
        metrics[f"{prefix}/mean_auc"] = float(np.mean(aucs))
    if uaucs:
        weights = WECHAT_ACTION_WEIGHTS if all(t in WECHAT_ACTION_WEIGHTS for t in uaucs) else {t: 1.0 for t in uaucs}
        metrics[f"{prefix}/score"] = weighted_score(uaucs, weights)
    return metrics


def evaluate(model: MultiTaskModel, data_dir: str | Path, split: str, spec: FeatureSpec,
             batch_size: int = 32768) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    """Scores of ``split`` read locally; returns ``(metrics, probs, meta)``."""
    probs, labels, meta = predict(model, data_dir, split, spec, batch_size)
    if labels is None:
        raise ValueError(f"{data_dir}/{split} has no labels to evaluate")
    return score_predictions(probs, labels, meta.get("_user"), spec.tasks, split), probs, meta


def oracle_probabilities(raw_dir: str | Path, meta: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray | None:
    """The generator's true probabilities ``[N, K]`` of the rows in ``meta`` (by source row),
    or None when ``raw_dir`` has no oracle (real data)."""
    path = Path(raw_dir) / "oracle" / "oracle_train.parquet"
    if not path.is_file():
        return None
    oracle = pq.read_table(path).to_pandas().set_index("row")
    rows = meta["_row"] - 1  # preprocess numbers data rows from 1; the oracle from 0
    joined = oracle.loc[rows]
    if not np.array_equal(joined["userid"].to_numpy(), meta["_user"]):
        raise ValueError(f"{path}: oracle rows do not line up with the preprocessed rows (userid mismatch)")
    return np.stack([joined[f"p_{t}"].to_numpy() for t in tasks], axis=1)


def oracle_metrics(raw_dir: str | Path, meta: dict[str, np.ndarray], labels: np.ndarray, tasks: list[str]) -> dict[str, float]:
    """The official metrics of the generator's true probabilities on the same rows (``oracle/``);
    empty for real data."""
    probs = oracle_probabilities(raw_dir, meta, tasks)
    if probs is None:
        return {}
    return score_predictions(probs, labels, meta["_user"], tasks, "oracle")


@torch.no_grad()
def mean_routing(model: MultiTaskModel, batches: Iterable[Batch], max_rows: int = 32768) -> dict[str, np.ndarray]:
    """Per-task mean gate/routing weights ``[K, E]`` over (up to ``max_rows``) rows: how much
    each task uses each expert (empty for architectures without gates)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, np.ndarray] = {}
    rows = 0
    try:
        for batch in batches:
            feats = {k: host_to_device(v, device) for k, v in batch.features.items()}
            for name, weights in model.routing_weights(feats).items():
                if weights.dim() == 3:  # [B, K, E]
                    sums[name] = sums.get(name, 0) + weights.sum(0).double().cpu().numpy()
            rows += len(batch)
            if rows >= max_rows:
                break
    finally:
        model.train(was_training)
    return {name: total / max(rows, 1) for name, total in sums.items()}
