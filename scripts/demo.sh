#!/usr/bin/env bash
# The main job: set-up, then the reproduction demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m benchmarks.demo "$@"
