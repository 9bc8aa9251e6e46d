#!/usr/bin/env bash
# Everything CI runs: set-up, lint, format check, type check, test suite, and (without
# arguments, as CI runs it) the tests on the oldest torch pyproject.toml claims.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/ruff check torch_seqreptile tests benchmarks conftest.py docs/conf.py
.venv/bin/ruff format --check torch_seqreptile tests benchmarks conftest.py docs/conf.py
.venv/bin/mypy torch_seqreptile
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
    bash scripts/test_oldest_torch.sh
fi
