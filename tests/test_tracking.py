"""MLflow runs never stay RUNNING when the process is told to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_ends_runs_instead_of_leaving_them_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import mlflow, os, signal, time
        from pipeline.tracking import sigterm_as_interrupt, tracked_run
        with tracked_run({uri!r}, "e", run_name="tracked"):
            try:
                mlflow.set_tracking_uri({uri!r}); mlflow.set_experiment("e")
                with sigterm_as_interrupt(), mlflow.start_run(run_name="plain"):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(30)
            finally:
                pass
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0  # interrupted, not finished
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r.info.status for r in client.search_runs([client.get_experiment_by_name("e").experiment_id])}
    assert runs == {"tracked": "KILLED", "plain": "FAILED"}


def test_an_end_set_by_another_process_is_kept(tmp_path):
    """A Tune search ends the run of a trial it stopped (FINISHED) while the trial's own process
    may still unwind with an error: the trial must not turn it FAILED afterwards; a run nobody
    ended still ends FAILED on an error."""
    from pipeline.tracking import tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    try:
        with tracked_run(uri, "exp", run_name="stopped") as run_id:
            client.set_terminated(run_id, status="FINISHED")  # the search's word
            raise RuntimeError("the trial's process is torn down")
    except RuntimeError:
        pass
    assert client.get_run(run_id).info.status == "FINISHED"
    try:
        with tracked_run(uri, "exp", run_name="failed") as other:
            raise RuntimeError("a real error")
    except RuntimeError:
        pass
    assert client.get_run(other).info.status == "FAILED"
