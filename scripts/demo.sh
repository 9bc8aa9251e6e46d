#!/usr/bin/env bash
# The main job: set-up, then the reproduction of the paper's synthetic experiment (Fig. 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m benchmarks.synthetic.experiment "$@"
