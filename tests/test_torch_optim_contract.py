"""PyTorch's ``TestOptimRenewed`` against SeqReptile and Reptile (opt-in).

Runs only when ``TORCH_TEST_OPTIM`` names PyTorch's ``test/test_optim.py`` of the installed
torch's tag (see ``benchmarks/torch_optim_contract.py``) and ``expecttest`` is installed::

    TORCH_TEST_OPTIM=/tmp/pytorch/test/test_optim.py python -m pytest tests/test_torch_optim_contract.py

The script runs in a subprocess: importing torch's test utilities changes global torch
state (``torch.backends.disable_global_flags()``) that other tests must not inherit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = os.environ.get("TORCH_TEST_OPTIM", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not TEST_FILE, reason="set TORCH_TEST_OPTIM to PyTorch's test/test_optim.py"
    ),
]


def test_wrappers_pass_torch_optimizer_contract() -> None:
    pytest.importorskip("expecttest")
    assert Path(TEST_FILE).is_file(), f"TORCH_TEST_OPTIM={TEST_FILE!r} is not a file"
    command = [sys.executable, "-m", "benchmarks.torch_optim_contract", "--test-file", TEST_FILE]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    # exit 0: every test ran passed or skipped, and some ran; else the table and the failures
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
