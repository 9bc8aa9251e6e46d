#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch 2.13.0 and this package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench,hf,nlp]"
