"""``python -m pipeline report --runs RUN_ID [RUN_ID ...] [--tracking-uri URI] [--out report.md]``:
the multi-task report rebuilt from MLflow runs, printed, written to ``--out`` (plots in
``<stem>_plots/`` beside it) and logged to MLflow as a run ``report``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import OutputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN_ID",
                        help="MLflow training runs: the multi-task models and their single-task baseline(s)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI of the runs (default: MLFLOW_TRACKING_URI, else MLflow's default)")
    parser.add_argument("--out", default="report.md", help="the Markdown report to write (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the users (default: %(default)s)")
    parser.add_argument("--level", type=float, default=0.95, help="bootstrap interval coverage (default: %(default)s)")
    parser.add_argument("--min-users", type=int, default=10,
                        help="compare a task only when this many validation users have both classes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment of the report run (default: the first run's)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read
    import mlflow
    from pydantic import ValidationError

    from pipeline.errors import ConfigError
    from pipeline.report.build import ReportConfig, build_report, close, log_report, write_report

    try:
        cfg = ReportConfig(n_boot=args.bootstrap, level=args.level, seed=args.seed, min_users=args.min_users)
    except ValidationError as exc:
        raise ConfigError(f"report options: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    out = Path(args.out)
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder; give a file name such as {out / 'report.md'}")
    client = mlflow.MlflowClient(args.tracking_uri)
    report = build_report(client, args.runs, cfg)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_dir = write_report(report, out)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write the report ({exc})") from None
    finally:
        close(report)
    print(report.markdown)
    print(f"report: {out} (plots in {plot_dir}/)")
    if not args.no_log:
        run_id = log_report(client, report, out, args.experiment)
        print(f"MLflow run {run_id} in {client.tracking_uri}")
    return 0
