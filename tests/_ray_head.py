"""A real Ray head for CLI tests: ``ray start --head --block`` in its own process group, stopped
by that group id (never ``ray stop``, which would end every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc: subprocess.Popen, port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"ray start --head failed here: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.skip(f"the Ray head's port {port} did not open in time on this machine")


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: no RAY_ADDRESS, this repository importable, the venv
    first on PATH (a job's entrypoint runs with the head's ``python``)."""
    # nothing that points at the test session's own cluster (its address, its State API)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int, env: dict[str, str], cwd: Path, dashboard_port: int | None = None,
             timeout: float = 90) -> Iterator[int]:
    """A head on 127.0.0.1 (with a job server when ``dashboard_port`` is given); yields its GCS port."""
    port = free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", str(num_cpus),
           "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
           # ports of their own: Ray's defaults (client server 10001, dashboard agent 52365) may
           # be held by the test session's cluster
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    if dashboard_port is None:
        cmd += ["--include-dashboard", "false"]
    else:
        cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        _wait_for_port(head, port, deadline)
        if dashboard_port is not None:
            _wait_for_port(head, dashboard_port, deadline)
        yield port
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and what it started: our own process group
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
