#!/usr/bin/env bash
# Everything CI runs: set-up, lint, format check, type check, test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/ruff check torch_seqreptile tests benchmarks
.venv/bin/ruff format --check torch_seqreptile tests benchmarks
.venv/bin/mypy torch_seqreptile
.venv/bin/python -m pytest "$@"
