"""A local ``preprocess`` starts its own Ray even when a head runs on the machine (``ray.init()``
with no address would silently join it, and reject ``--num-cpus``); ``--address`` joins it.

Starts a real head (``ray start --head --block`` in its own process group, stopped by that
group id, never by ``ray stop``, which would end every Ray on the machine) and runs the CLI in
subprocesses; about 40 s on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preprocess(env: dict[str, str], raw: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "preprocess", "--raw", str(raw), "--out", str(out), *flags]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _gcs_port(report: dict) -> int:
    """The GCS port of the Ray a run used (the host part names the machine's address)."""
    return int(report["ray"]["gcs_address"].rsplit(":", 1)[1])


@pytest.mark.skipif(not RAY.exists(), reason="no ray CLI next to this Python")
def test_local_run_does_not_join_a_running_head(tiny_raw: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
         "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--include-dashboard", "false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the head is up once its GCS port accepts connections
            if head.poll() is not None:
                pytest.skip(f"ray start --head failed here: {head.stdout.read()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.skip("the Ray head did not come up within 90 s on this machine")
        local = _preprocess(env, tiny_raw, tmp_path / "local", "--num-cpus", "1")
        assert _gcs_port(local) != port
        # the head made a token (Ray's default); a driver joining it must look for the token
        joined = _preprocess({**env, "RAY_AUTH_MODE": "token"}, tiny_raw, tmp_path / "joined",
                             "--address", f"127.0.0.1:{port}")
        assert _gcs_port(joined) == port  # the check tells joining from not joining
        assert joined["splits"] == local["splits"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and what it started: our own process group
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
