"""The multi-task report from MLflow runs: per-task AUC and uAUC and the weighted score of each
model beside the oracle's (generated data); each multi-task model against the single-task
baseline with the paired bootstrap over users (:mod:`.outcome`); per model the loss scales, the
task-gradient cosine and conflict matrices and the gate utilisation over training.

Written as Markdown with its plots in ``<stem>_plots/`` beside it, and logged to MLflow as a run
of its own (``report.md`` and the same plot folder) in the first run's experiment.

Example:
    >>> # report = build_report(mlflow.MlflowClient(uri), [run_a, run_b], ReportConfig())
    >>> # write_report(report, "report.md"); log_report(client, report, "report.md")
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.report import outcome
from pipeline.report.runs import ReportError, RunData, load_run
from pipeline.train import plots


class ReportConfig(BaseModel):
    """The bootstrap behind the outcome classes (the noise tolerance the report states)."""

    model_config = ConfigDict(extra="forbid")
    n_boot: int = Field(1000, ge=1)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    split: str = "valid"
    #: a task with fewer validation users having both classes is not compared (a bootstrap
    #: over a handful of users gives an interval of no width, not a tolerance)
    min_users: int = Field(10, ge=1)


@dataclass
class Comparison:
    """A multi-task run against the single-task baseline, task by task."""

    run: RunData
    differences: dict[str, outcome.TaskDifference]  # tasks with a baseline and predictions
    baseline: dict[str, str]  # task -> baseline run id
    missing: list[str]  # tasks not compared: no baseline, or fewer than min_users users with both classes
    outcome: str | None  # None: nothing to compare
    reason: str = ""  # why there is no outcome
    too_few: dict[str, outcome.TaskDifference] = field(default_factory=dict)  # left out: too few users


@dataclass
class Report:
    runs: list[RunData]
    comparisons: list[Comparison]
    config: ReportConfig
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib figure
    markdown: str = ""


def build_report(client: Any, run_ids: list[str], cfg: ReportConfig | None = None) -> Report:
    """Read the runs, compare, draw and render (``client``: an ``mlflow.MlflowClient``)."""
    cfg = cfg or ReportConfig()
    if not run_ids:
        raise ReportError("no runs given")
    runs = [load_run(client, r, cfg.split) for r in dict.fromkeys(run_ids)]
    baselines = single_task_baselines(runs)
    comparisons = [compare(run, baselines, cfg) for run in runs if not run.is_single_task]
    report = Report(runs, comparisons, cfg)
    report.figures = _figures(report)
    report.markdown = render(report)
    return report


def single_task_baselines(runs: list[RunData]) -> dict[str, RunData]:
    """task -> the single-task run it is compared with: a run that learnt that task alone if
    there is one, else the run that learnt every task independently (``single_task``)."""
    out: dict[str, RunData] = {}
    singles = [r for r in runs if r.is_single_task and r.predictions is not None]
    for task in dict.fromkeys(t for r in singles for t in r.tasks):
        having = [r for r in singles if task in r.tasks]
        alone = [r for r in having if r.tasks == [task]]
        chosen = alone or having
        if len(chosen) > 1:
            ids = ", ".join(r.run_id for r in chosen)
            raise ReportError(f"task {task!r}: {len(chosen)} single-task runs could be its baseline ({ids}); give one")
        out[task] = chosen[0]
    return out


def compare(run: RunData, baselines: dict[str, RunData], cfg: ReportConfig) -> Comparison:
    """The paired bootstrap on every task of ``run`` that has a baseline, and the outcome."""
    if run.predictions is None:
        return Comparison(run, {}, {}, list(run.tasks), None, "the run logged no validation predictions")
    diffs: dict[str, outcome.TaskDifference] = {}
    too_few: dict[str, outcome.TaskDifference] = {}
    for task in run.tasks:
        if task not in baselines:
            continue
        base = baselines[task]
        assert base.predictions is not None
        labels, p, pb, users = paired_task(run, base, task)
        d = outcome.paired_bootstrap_uauc(labels, p, pb, users, cfg.n_boot, cfg.level, cfg.seed)
        if d.users >= cfg.min_users:
            diffs[task] = d
        elif d.users:  # none: uAUC is undefined, nothing to show
            too_few[task] = d
    missing = [t for t in run.tasks if t not in diffs]
    if not diffs:
        has_base = any(t in baselines for t in run.tasks)
        reason = f"no task with {cfg.min_users}+ users to compare" if has_base else "no single-task baseline run among the runs"
        return Comparison(run, {}, {}, missing, None, reason, too_few)
    verdicts = {t: d.verdict for t, d in diffs.items()}
    return Comparison(run, diffs, {t: baselines[t].run_id for t in diffs}, missing, outcome.classify(verdicts), too_few=too_few)


def paired_task(run: RunData, base: RunData, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, probs, base_probs, users)`` of ``task`` on the rows both runs predicted
    (paired by source row when both logged it, else by position), labelled rows only."""
    a, b = run.predictions, base.predictions
    assert a is not None and b is not None
    pa_, ya = a.task(task)
    pb_, yb = b.task(task)
    if a.rows is not None and b.rows is not None:
        common, ia, ib = np.intersect1d(a.rows, b.rows, assume_unique=True, return_indices=True)
        if len(common) < max(len(a.rows), len(b.rows)):
            raise ReportError(f"task {task!r}: runs {run.run_id} and {base.run_id} predicted different validation "
                              f"rows ({len(a.rows)} and {len(b.rows)}, {len(common)} in common): different data?")
    elif len(a.users) == len(b.users) and np.array_equal(a.users, b.users):
        ia = ib = np.arange(len(a.users))
    else:
        raise ReportError(f"task {task!r}: runs {run.run_id} and {base.run_id} did not predict the same validation rows")
    ya, yb = ya[ia], yb[ib]
    both = ~np.isnan(ya)
    if not np.array_equal(ya[both], yb[both]) or not np.array_equal(both, ~np.isnan(yb)):
        raise ReportError(f"task {task!r}: runs {run.run_id} and {base.run_id} have different labels on the same rows")
    return ya[both], pa_[ia][both], pb_[ib][both], a.users[ia][both]


# ---------------------------------------------------------------------- figures


def _slug(run: RunData, i: int) -> str:
    return f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run.model}_{run.strategy}")


def _figures(report: Report) -> dict[str, Any]:
    figures = {**_uauc_figure(report), **_difference_figure(report)}
    for i, run in enumerate(report.runs):
        slug = _slug(run, i)
        per_run = {**plots.loss_curves(run.loss_history, run.tasks),
                   **plots.routing_heatmaps(run.routing, run.tasks)}
        if run.gradients:
            history = [{"step": h["step"], "gradients": h} for h in run.gradients["history"]]
            per_run.update(plots.gradient_plots(history, run.gradients["tasks"]))
        figures.update({f"{slug}_{name}": fig for name, fig in per_run.items()})
    return figures


def _uauc_figure(report: Report) -> dict[str, Any]:
    """Grouped bars: uAUC per task for every run, the oracle's as black ticks."""
    tasks = list(dict.fromkeys(t for r in report.runs for t in r.metrics["uauc"]))
    if not tasks:
        return {}
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2) + 3, 4))
    width = 0.8 / len(report.runs)
    x = np.arange(len(tasks))
    for i, run in enumerate(report.runs):
        ax.bar(x - 0.4 + width * (i + 0.5), [run.metrics["uauc"].get(t, np.nan) for t in tasks], width, label=run.label)
    oracle = next((r.oracle for r in report.runs if r.oracle), None)
    if oracle:
        ax.scatter(x, [oracle["uauc"].get(t, np.nan) for t in tasks], marker="_", s=600, c="k", label="oracle", zorder=3)
    values = [v for r in report.runs for v in r.metrics["uauc"].values()] + (list(oracle["uauc"].values()) if oracle else [])
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set(ylabel=f"{report.config.split} uAUC", title="uAUC per task")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return {"uauc_per_task.png": fig}


def _difference_figure(report: Report) -> dict[str, Any]:
    """uAUC(model) - uAUC(single task) per task with its bootstrap interval, per multi-task run."""
    compared = [c for c in report.comparisons if c.differences]
    if not compared:
        return {}
    tasks = list(dict.fromkeys(t for c in compared for t in c.differences))
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2) + 3, 4))
    x = np.arange(len(tasks))
    step = 0.8 / len(compared)
    for i, c in enumerate(compared):
        d = [c.differences.get(t) for t in tasks]
        mid = np.array([v.diff if v else np.nan for v in d])
        err = np.array([[v.diff - v.low, v.high - v.diff] if v else [np.nan, np.nan] for v in d]).T
        ax.errorbar(x - 0.4 + step * (i + 0.5), mid, yerr=err, fmt="o", capsize=3, label=f"{c.run.label}: {c.outcome}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    level = int(round(report.config.level * 100))
    ax.set(ylabel="uAUC - single-task uAUC", title=f"against the single-task baseline ({level}% bootstrap intervals over users)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return {"vs_single_task.png": fig}


# ---------------------------------------------------------------------- Markdown


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


_ARROW = {outcome.BETTER: "▲", outcome.WORSE: "▼", outcome.EQUAL: "="}


def render(report: Report, plot_dir: str = "report_plots") -> str:
    """The report as Markdown; images are linked as ``plot_dir/<file>``."""
    cfg, runs = report.config, report.runs
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    img = lambda name, alt: [f"![{alt}]({plot_dir}/{name})", ""] if name in report.figures else []  # noqa: E731
    lines = ["# Multi-task report", "", f"Runs ({len(runs)}), metrics on the `{cfg.split}` split:", ""]
    lines += [f"- `{r.run_id}` {r.label}" for r in runs] + [""]

    def metric_rows(kind: str) -> list[list[str]]:
        rows = [[r.model, r.strategy, r.name, _fmt(r.metrics["score"])] + [_fmt(r.metrics[kind].get(t)) for t in tasks]
                for r in runs]
        oracle = next((r.oracle for r in runs if r.oracle), None)
        if oracle:
            rows.append(["**oracle**", "", "true probabilities", _fmt(oracle["score"])]
                        + [_fmt(oracle[kind].get(t)) for t in tasks])
        return rows

    lines += ["## Weighted score and uAUC per task", ""]
    lines += _table(["model", "strategy", "run", "score"] + tasks, metric_rows("uauc")) + [""]
    lines += img("uauc_per_task.png", "uAUC per task")
    lines += ["## AUC per task", "", "(the score column is the uAUC-weighted score, as above)", ""]
    lines += _table(["model", "strategy", "run", "score"] + tasks, metric_rows("auc")) + [""]

    level = int(round(cfg.level * 100))
    lines += ["## Against the single-task baseline", "",
              f"Per task, Δ = uAUC(model) − uAUC(single task) on the same validation rows, with its {level}% "
              f"percentile interval from a paired bootstrap over users ({cfg.n_boot} resamples, seed {cfg.seed}), on "
              f"tasks where at least {cfg.min_users} users have both classes. "
              "A task counts as better (▲) or worse (▼) only when the interval excludes 0; otherwise as equal (=). "
              "Outcome: every task better: *well done*; none worse and some better: *good*; some better and some "
              "worse: *seesaw*; every task worse: *negative transfer*; all equal: *no difference*; none better and "
              "some (not all) worse: *some worse*.", ""]
    if not report.comparisons:
        lines += ["No multi-task run among the runs.", ""]
    rows = []
    for c in report.comparisons:
        cells = []
        for t in tasks:
            d, few = c.differences.get(t), c.too_few.get(t)
            if d is not None:
                cells.append(f"{_ARROW[d.verdict]} {d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
            else:
                cells.append("–" if few is None else f"({few.diff:+.4f}, {few.users} user{'s' * (few.users > 1)})")
        rows.append([c.run.model, c.run.strategy, c.run.name, f"**{c.outcome}**" if c.outcome else c.reason] + cells)
    if rows:
        lines += _table(["model", "strategy", "run", "outcome"] + tasks, rows) + [""]
        used = sorted({(t, rid) for c in report.comparisons for t, rid in c.baseline.items()})
        skipped = {t for c in report.comparisons if c.differences for t in c.missing}
        if skipped:
            lines += [f"Not compared: {', '.join(sorted(skipped))}: no single-task run for the task, no validation "
                      f"user with both classes (–, uAUC undefined), or fewer than {cfg.min_users} such users (in "
                      "parentheses: Δ and the users). The outcome is over the other tasks.", ""]
        if used:
            by_run: dict[str, list[str]] = {}
            for t, rid in used:
                by_run.setdefault(rid, []).append(t)
            lines += ["Baselines: " + "; ".join(f"`{rid}` for {', '.join(ts)}" for rid, ts in by_run.items()), ""]
        lines += img("vs_single_task.png", "against the single-task baseline")

    lines += ["## Training diagnostics per run", "",
              "Loss scales (per-task training loss, log scale), task-gradient cosine and conflict matrices averaged "
              "over training, gradient norms and conflict rate over training, and gate utilisation (mean routing "
              "weight per task and expert on the validation rows), where the run logged them.", ""]
    for i, r in enumerate(runs):
        slug = _slug(r, i)
        names = [n for n in report.figures if n.startswith(slug + "_")]
        lines += [f"### {r.label}", ""]
        if not r.gradients:
            lines += ["No task-gradient diagnostics logged (the strategy computed no per-task gradients).", ""]
        if not r.routing:
            lines += ["No gates (the architecture routes nothing).", ""]
        for name in names:
            lines += img(name, name[len(slug) + 1:].removesuffix(".png").replace("_", " "))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------- output


def plot_dir_for(out: str | Path) -> Path:
    """The plot folder beside a report file: ``report.md`` -> ``report_plots/``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_plots")


def write_report(report: Report, out: str | Path) -> Path:
    """Write ``out`` (Markdown) and its plots; returns the plot folder."""
    out = Path(out)
    plot_dir = plot_dir_for(out)
    plot_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in report.figures.items():
        fig.savefig(plot_dir / name, dpi=110)
    report.markdown = render(report, plot_dir.name)
    out.write_text(report.markdown)
    return plot_dir


def log_report(client: Any, report: Report, out: str | Path, experiment: str | None = None) -> str:
    """Log a written report (``out`` and its plot folder) as a new run ``report`` in the
    experiment named ``experiment`` (default: the first run's); returns its id."""
    from pipeline.tracking import tracked_run

    out = Path(out)
    if experiment is None:
        experiment = client.get_experiment(client.get_run(report.runs[0].run_id).info.experiment_id).name
    tags = {"mtlrank.kind": "report", "mtlrank.report_runs": ",".join(r.run_id for r in report.runs)}
    with tracked_run(client.tracking_uri, experiment, run_name="report", tags=tags) as run_id:
        client.log_artifact(run_id, str(out))
        client.log_artifacts(run_id, str(plot_dir_for(out)), plot_dir_for(out).name)
    return run_id


def close(report: Report) -> None:
    """Release the figures."""
    plots.close_all(report.figures)
    report.figures = {}
