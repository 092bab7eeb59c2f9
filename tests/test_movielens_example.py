"""The worked example of docs/dataset_config.md, end to end: its two ``python -m pipeline``
commands, taken from the document, run in subprocesses on a SYNTHETIC log in the
ml-latest-small format (tests/synthetic_movielens.py; not MovieLens data), with only the folder
names replaced. No edit of the data and no Python between the commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic_movielens import write_synthetic_movielens

ROOT = Path(__file__).resolve().parents[1]


def documented_commands() -> list[list[str]]:
    """The ``python -m pipeline`` commands of the reference's worked example (the sh block)."""
    text = (ROOT / "docs" / "dataset_config.md").read_text()
    block = re.search(r"## Worked example.*?```sh\n(.*?)```", text, re.S)
    assert block, "no sh block in the worked example"
    commands = [shlex.split(c) for c in block.group(1).replace("\\\n", " ").strip().splitlines()]
    assert [c[:4] for c in commands] == [["python", "-m", "pipeline", "preprocess"], ["python", "-m", "pipeline", "train"]]
    return commands


@pytest.mark.slow
def test_the_worked_example_runs_with_the_cli_alone(tmp_path: Path) -> None:
    raw = write_synthetic_movielens(tmp_path / "ml-latest-small", users=120, movies=150, per_user=40, seed=11)
    places = {"ml-latest-small": str(raw), "data/movielens": str(tmp_path / "data"), "runs/movielens": str(tmp_path / "runs")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    outputs = []
    t0 = time.perf_counter()
    for cmd in documented_commands():
        argv = [sys.executable, *[places.get(a, a) for a in cmd[1:]], "--num-cpus", "2"]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc)
    elapsed = time.perf_counter() - t0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["splits"] == {"train": 3840, "valid": 480, "test": 480}
    assert report["history"]["protocol"] == "online" and report["split_rule"]["kind"] == "ordered"
    train = outputs[1]
    assert re.search(r"^valid/score\s+0\.\d+", train.stdout, re.M), train.stdout
    assert re.search(r"^valid/uauc_liked\s", train.stdout, re.M) and re.search(r"^valid/uauc_rated_5\s", train.stdout, re.M)
    # 3840 rows / 256 = 15 steps an epoch x 2 epochs: below 300, and the user is told so
    assert "steps 30;" in train.stdout
    assert "train: warning: this run takes 30 optimiser steps, fewer than 300" in train.stderr
    assert "set train.epochs=20" in train.stderr
    print(f"worked example: preprocess + train took {elapsed:.1f} s")
