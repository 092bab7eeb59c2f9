"""The multi-task report: per-task scores beside the oracle's, each multi-task model against the
single-task baseline with a stated noise tolerance (:mod:`.outcome`), and the training
diagnostics, rebuilt from MLflow runs (:mod:`.build`, ``python -m pipeline report``).
Training runs log the per-row validation predictions it needs with
:func:`~pipeline.report.predictions.log_validation_predictions`."""

from pipeline.report.build import Comparison, Report, ReportConfig, build_report, log_report, write_report
from pipeline.report.outcome import OUTCOMES, TaskDifference, classify, paired_bootstrap_uauc
from pipeline.report.predictions import PREDICTIONS_ARTIFACT, Predictions, load_validation_predictions, log_validation_predictions
from pipeline.report.runs import ReportError, RunData, load_run

__all__ = [
    "Comparison", "OUTCOMES", "PREDICTIONS_ARTIFACT", "Predictions", "Report", "ReportConfig", "ReportError", "RunData",
    "TaskDifference", "build_report", "classify", "load_run", "load_validation_predictions", "log_report",
    "log_validation_predictions", "paired_bootstrap_uauc", "write_report",
]
