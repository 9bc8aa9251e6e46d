#!/usr/bin/env bash
# The tests on the oldest torch that pyproject.toml claims ("torch>=X": torch==X), in a venv of
# their own (.venv-oldest, created or reused) with nothing but torch, numpy, scipy, hypothesis and
# pytest: the tests of the extras skip there. This checkout is imported through PYTHONPATH.
# Left out: the packaging test (it builds with the main venv) and the benchmark scripts' tests;
# the root conftest.py (the documentation, which needs Sybil) by --confcutdir.
# Arguments go to pytest. PyPI's torch wheels for Linux are CUDA builds (~3.5 GB with the nvidia
# wheels): the first run downloads them.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if [ -z "$oldest" ]; then
    echo 'pyproject.toml has no "torch>=X" dependency' >&2
    exit 1
fi
if [ ! -x .venv-oldest/bin/python ]; then
    python3 -m venv .venv-oldest
fi
.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check \
    "torch==$oldest" numpy scipy hypothesis pytest
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PYTHONPATH="$PWD" .venv-oldest/bin/python -m pytest tests -p no:cacheprovider -o addopts=-ra \
    --confcutdir=tests \
    --ignore=tests/test_packaging.py \
    --ignore=tests/test_gpu_check.py \
    --ignore=tests/test_speed_benchmarks.py \
    --ignore=tests/test_synthetic_benchmark.py \
    "$@"
