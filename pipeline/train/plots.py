"""Figures a person would rather see than read, logged as MLflow artifacts: per-task training
losses, validation scores per evaluation, the task-gradient cosine and conflict matrices, the
gradient norms and conflict rate over training, gate utilisation per task.

Every function returns ``{artifact path: matplotlib figure}`` (empty when there is nothing to
draw); the caller logs and closes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    rows = [h for h in history if all(f"train/loss_{t}" in h for t in tasks)]
    if not rows:
        return {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in rows]
    for t in tasks:
        ax.plot(steps, [max(h[f"train/loss_{t}"], 1e-8) for h in rows], label=t)
    ax.set(xlabel="step", ylabel="train BCE (mean over ranks)", yscale="log", title="per-task training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return {"loss_curves.png": fig}


def validation_curves(evaluations: list[dict[str, float]], tasks: list[str], split: str = "valid") -> dict[str, Any]:
    if not evaluations:
        return {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e["step"] for e in evaluations]
    for t in tasks:
        key = f"{split}/uauc_{t}"
        if any(key in e for e in evaluations):
            ax.plot(steps, [e.get(key, np.nan) for e in evaluations], marker=".", label=f"uAUC {t}", alpha=0.7)
    if any(f"{split}/score" in e for e in evaluations):
        ax.plot(steps, [e.get(f"{split}/score", np.nan) for e in evaluations], "k-o", lw=2, label="weighted score")
    ax.set(xlabel="step", ylabel="validation", title="validation per evaluation")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return {"validation_curves.png": fig}


def gradient_plots(history: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Cosine and conflict matrices averaged over training, norms and conflict rate over time."""
    rows = [h for h in history if "gradients" in h]
    if not rows:
        return {}
    plt = pyplot()
    weights = np.array([h["gradients"]["steps"] for h in rows], dtype=float)
    cos = np.average([np.array(h["gradients"]["cosine"]) for h in rows], axis=0, weights=weights)
    conflict = np.average([np.array(h["gradients"]["conflict"]) for h in rows], axis=0, weights=weights)
    out = {}
    for name, mat, cmap, lim in (("gradient_cosine.png", cos, "RdBu", (-1, 1)), ("gradient_conflict.png", conflict, "Reds", (0, 1))):
        fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(tasks), 1.2 + 0.6 * len(tasks)))
        im = ax.imshow(mat, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        title = "mean task-gradient cosine" if "cosine" in name else "share of steps with conflict (cos < 0)"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out[name] = fig
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in rows]
    norms = np.array([h["gradients"]["grad_norm"] for h in rows])
    for k, t in enumerate(tasks):
        a1.plot(steps, np.maximum(norms[:, k], 1e-12), label=t)
    a1.set(xlabel="step", ylabel="shared-parameter gradient norm", yscale="log", title="task gradient norms")
    a1.legend(fontsize=7)
    k = len(tasks)
    off = ~np.eye(k, dtype=bool)
    a2.plot(steps, [np.array(h["gradients"]["conflict"])[off].mean() for h in rows], "r-")
    a2.set(xlabel="step", ylabel="share of task pairs in conflict", ylim=(0, 1), title="gradient conflict rate")
    fig.tight_layout()
    out["gradient_norms_conflict.png"] = fig
    return out


def routing_heatmaps(routing: dict[str, np.ndarray], tasks: list[str]) -> dict[str, Any]:
    """One tasks x experts heatmap per routing tensor (mean gate weight per task)."""
    plt = pyplot()
    out = {}
    for name, mean in routing.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * mean.shape[1], 1.0 + 0.4 * mean.shape[0]))
        im = ax.imshow(mean, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xticks(range(mean.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"mean {name} weight per task (validation)", fontsize=9)
        for (i, j), v in np.ndenumerate(mean):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out[f"routing_{name}.png"] = fig
    return out


def close_all(figures: dict[str, Any]) -> None:
    """Close every figure of ``{artifact path: figure}`` (matplotlib keeps open ones alive)."""
    plt = pyplot()
    for fig in figures.values():
        plt.close(fig)
