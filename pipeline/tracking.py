"""MLflow set-up shared by every entry point: where the store is (an embedded sqlite file
under the run's ``--out`` by default, any tracking URI by config), an experiment whose
artifacts also live under ``--out``, runs that end FAILED or KILLED rather than RUNNING when the
process dies, and a client-side logger for rank 0 of a Ray Train run (no global active run, so
it works inside a worker process).

Example:
    >>> # uri = resolve_tracking_uri(None, out)
    >>> # with tracked_run(uri, "mtlrank-train", run_name="mmoe") as run_id: ...
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def resolve_tracking_uri(uri: str | None, out: str | Path) -> str:
    """``uri`` or ``sqlite:///<out>/mlflow.db`` (absolute: ``ray job submit`` runs in a copy of
    the working directory)."""
    if uri:
        return uri
    return f"sqlite:///{(Path(out).resolve() / 'mlflow.db')}"


def ensure_experiment(uri: str, name: str, artifact_root: str | Path | None) -> str:
    """The experiment's id, created with its artifacts under ``artifact_root`` when new (MLflow's
    default would be ``./mlruns`` of the working directory)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def tracked_run(uri: str, experiment: str, run_name: str | None = None, artifact_root: str | Path | None = None,
                tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                run_id: str | None = None) -> Iterator[str]:
    """A run that ends FINISHED on success, FAILED on an error and KILLED on Ctrl-C or SIGTERM
    (never left RUNNING) unless another process ended it first (that end is kept); yields its id.
    Nothing global is set, so it nests freely.
    ``run_id``: continue that existing run (a resumed search) instead of creating one."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    else:
        exp_id = ensure_experiment(uri, experiment, artifact_root)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    previous = _sigterm_as_interrupt()
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # a run someone else has ended meanwhile keeps that end: a Tune search ends the run of a
        # trial it stopped (FINISHED for ASHA) while the trial's process may still be tearing down
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
        _restore_sigterm(previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so ``with`` blocks such as an
    MLflow run end their run instead of the process dying with it RUNNING)."""
    previous = _sigterm_as_interrupt()
    try:
        yield
    finally:
        _restore_sigterm(previous)


def _sigterm_as_interrupt() -> Any:
    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


class RunLogger:
    """Logs to one existing run through the client API (usable in any process, e.g. rank 0 of
    a Ray Train worker group)."""

    def __init__(self, uri: str, run_id: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(batch), 900):  # the store's batch limit is 1000
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def dict(self, value: dict[str, Any], path: str) -> None:
        self.client.log_dict(self.run_id, value, path)

    def figure(self, fig: Any, path: str) -> None:
        self.client.log_figure(self.run_id, fig, path)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)
