"""Each speed benchmark script runs once in smoke mode and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.data import default_data_dir
from benchmarks.speed import bench_core, bench_surgery, grad_to_target


def test_core_speed_report(tmp_path: Path) -> None:
    bench_core.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "core_speed_quick.json").read_text())
    assert set(report["outer_update"]) >= {"foreach", "compiled", "per_tensor", "_meta"} - {"_meta"}
    assert report["wrapper_overhead"]["ratio"] > 0 and report["train_step"]["ratio"] > 0


def test_surgery_speed_report(tmp_path: Path) -> None:
    """Ours and the peers (test dependencies, so all of them here) in one report."""
    bench_surgery.main(["--rounds", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "surgery_speed.json").read_text())
    assert report["step_time_ratio_vs_mtl"]["MTL"] == 1.0
    assert report["peers_not_installed"] == []
    assert set(report["step_time_ratio_vs_mtl"]) == {
        *("MTL", "PCGrad", "GradVac", "GradNorm", "CAGrad", "MGDA"),
        *("torchjd PCGrad", "torchjd GradVac", "torchjd MGDA", "torchjd CAGrad"),
        "pytorch_optimizer PCGrad",
    }
    memory = report["peak_extra_memory_in_shared_param_sizes"]
    assert memory["PCGrad"] < memory["torchjd PCGrad"]  # the Gramian path's point


@pytest.mark.skipif(
    not (default_data_dir() / "masakhaner").exists(), reason="needs ../shared/data/masakhaner"
)
def test_gradient_computations_to_target_report(tmp_path: Path) -> None:
    grad_to_target.main(
        [
            *("--budget", "20", "--eval-every", "10", "--seeds", "0"),
            *("--max-sentences", "24", "--reptile", "5:0.5", "--out", str(tmp_path)),
        ]
    )
    report = json.loads((tmp_path / "grad_to_target.json").read_text())
    labels = {grad_to_target.label(r) for r in report["runs"]}
    assert labels == {"mtl", "sequential", "seqreptile K=5 eta=0.5"}
    for run in report["runs"]:
        assert run["curve"][0]["computations"] == 0
        assert run["curve"][-1]["computations"] == 20
    assert (tmp_path / "grad_to_target.png").read_bytes()[:4] == b"\x89PNG"
