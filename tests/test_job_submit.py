"""``ray job submit -- python -m pipeline train ...`` against a real head on 127.0.0.1 (started
with ``ray start --head --block`` in its own process group and stopped by that group id, never by
``ray stop``, which would end every Ray on the machine). About a minute on 2 cores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RAY.exists(), reason="no ray CLI next to this Python")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"port {port} did not open within {timeout} s")


@pytest.fixture
def ray_head(tmp_path):
    """A head with a job server: ``(dashboard address, env)``."""
    port, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_AUTH_MODE="token",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path,
    )
    try:
        _wait_for_port(head, port, 90)
        _wait_for_port(head, dash, 90)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and what it started: our own process group
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)


def test_ray_job_submit_train(ray_head, tiny_processed, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    cmd = [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", '{"excludes": [".venv", ".git", "runs", "tests"]}', "--",
           sys.executable, "-m", "pipeline", "train", "--config", "configs/train/mmoe.yaml",
           "--data", str(tiny_processed), "--out", str(out),
           "--set", "train.epochs=2", "--set", "train.batch_size=512", "--set", "train.optimizer.lr=0.01", "--set", "scaling.cpus_per_worker=0.5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in (done.stdout + done.stderr)
    # the job's run went to the store under --out (an absolute path, not the job's working copy)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtlrank-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["valid/score"] > 0.5
