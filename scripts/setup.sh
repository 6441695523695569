#!/usr/bin/env bash
# Create .venv and install kvproxy with its dev tools. torch is pinned to the local CPU build by
# constraints.txt (any other resolution would pull several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e '.[dev]'
