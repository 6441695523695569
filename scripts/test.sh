#!/usr/bin/env bash
# Set up, make sure Redis and Chromium are here, lint, and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest "$@"
