"""``ray job submit -- python -m pipeline train ...`` against the job server of the test
session's cluster (a head and a worker node on 127.0.0.1, ``tests/conftest.py``). About a minute
on 2 cores."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ray_head import RAY, REPO, cli_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RAY.exists(), reason="no ray CLI next to this Python")]


def test_ray_job_submit_train(ray_job_address, tiny_processed, tmp_path):
    address, env = ray_job_address, {**cli_env(), "RAY_AUTH_MODE": "token"}
    out = tmp_path / "run"
    cmd = [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", '{"excludes": [".venv", ".git", "runs", "tests"]}', "--",
           sys.executable, "-m", "pipeline", "train", "--config", "configs/train/mmoe.yaml",
           "--data", str(tiny_processed), "--out", str(out),
           "--set", "train.epochs=2", "--set", "train.batch_size=512", "--set", "train.optimizer.lr=0.01", "--set", "scaling.cpus_per_worker=0.5"]
    for _ in range(30):  # the head's job agent starts after its dashboard port opens
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in (done.stdout + done.stderr)
    # the job's run went to the store under --out (an absolute path, not the job's working copy)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtlrank-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["valid/score"] > 0.5
