#!/usr/bin/env bash
# Set up and start kvproxy. Arguments go to `kvproxy serve` (default: the offline demo model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kvproxy serve "$@"
