"""A run stopped at an arbitrary step and resumed in a fresh process continues bit-for-bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "tests.resume_script", *args], cwd=ROOT, check=True, timeout=120
    )


@pytest.mark.parametrize("method, stop_at", [("seqreptile", 10), ("reptile", 13)])
def test_fresh_process_resume_is_bit_exact(method: str, stop_at: int, tmp_path: Path) -> None:
    steps = 23  # stops inside a trajectory, an epoch of the sampler and (Reptile) a round
    run(method, str(steps), str(tmp_path / "full.pt"))
    run(method, str(steps), str(tmp_path / "ckpt.pt"), "--stop-at", str(stop_at))
    run(method, str(steps), str(tmp_path / "resumed.pt"), "--resume", str(tmp_path / "ckpt.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert full["slow"].keys() == resumed["slow"].keys()
    for key, tensor in full["slow"].items():
        assert torch.equal(tensor, resumed["slow"][key]), key
    initial = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(initial[k], full["model"][k]) for k in initial)
