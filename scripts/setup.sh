#!/usr/bin/env bash
# Create .venv and install the project. torch goes first: a bare torch requirement would
# otherwise pull a multi-GB CUDA build; with 2.13.0 (CPU) installed the project's range is met.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
