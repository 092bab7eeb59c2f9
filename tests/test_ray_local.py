"""A local ``preprocess`` starts its own Ray even when a head runs on the machine (``ray.init()``
with no address would silently join it, and reject ``--num-cpus``); ``--address`` joins it.

Starts a real head (``ray start --head --block`` in its own process group, stopped by that
group id, never by ``ray stop``, which would end every Ray on the machine) and runs the CLI in
subprocesses; about 40 s on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ray_head import RAY, REPO, ray_head, cli_env  # noqa: E402


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
    env = cli_env()
    with ray_head(1, env, tmp_path) as port:
        local = _preprocess(env, tiny_raw, tmp_path / "local", "--num-cpus", "1")
        assert _gcs_port(local) != port
        # the head made a token (Ray's default); a driver joining it must look for the token
        joined = _preprocess({**env, "RAY_AUTH_MODE": "token"}, tiny_raw, tmp_path / "joined",
                             "--address", f"127.0.0.1:{port}")
        assert _gcs_port(joined) == port  # the check tells joining from not joining
        assert joined["splits"] == local["splits"]
