"""The synthetic benchmark (Fig. 3) runs in a fast configuration and reports every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import experiment

METHODS = ["STL", "MTL", "GradNorm", "PCGrad", "GradVac", "RecAdam", "Reptile", "SeqReptile"]


def test_losses_have_their_minima_at_the_paper_points() -> None:
    for i, x in enumerate(experiment.MINIMA):
        at_minimum = experiment.task_losses(x.clone())[i]
        nearby = experiment.task_losses(x + torch.tensor([0.3, -0.2], dtype=torch.float64))[i]
        assert float(at_minimum) == pytest.approx(-200.0) and float(nearby) > float(at_minimum)


def test_fast_configuration_writes_table_json_and_figure(tmp_path: Path) -> None:
    result = experiment.main(
        [
            *("--budget", "90", "--inner-steps", "5", "--sweep-budgets", "30", "60"),
            *("--out", str(tmp_path), "--name", "fast"),
        ]
    )
    summary = result["summary"]
    assert list(summary) == [f"STL (task {t})" for t in (1, 2, 3)] + METHODS[1:]
    for row in summary.values():
        assert set(row) == {
            "final_point",
            "final_mtl_loss",
            "nearest_minimum",
            "distance_to_nearest_minimum",
            "in_a_local_minimum",
            "mean_cosine_along_trajectory",
            "final_cosine",
        }
        assert -1.0 <= row["final_cosine"] <= 1.0
    table = (tmp_path / "fast.md").read_text().splitlines()
    assert table[2].count("|") == 8 and len(table) == 4 + len(summary) + 5 + 3
    assert list(result["budget_sweep"]) == ["MTL", "Reptile", "SeqReptile"]
    assert list(result["budget_sweep"]["MTL"]) == ["30", "60"]
    saved = json.loads((tmp_path / "fast.json").read_text())
    assert saved["settings"]["budget"] == 90 and len(saved["trajectories"]["MTL"]) == 31
    assert (tmp_path / "fast.png").read_bytes()[:4] == b"\x89PNG"


def test_each_single_task_run_descends_toward_its_own_minimum() -> None:
    settings = experiment.Settings(budget=400, alpha=0.05, methods=["STL"], sweep_budgets=[])
    result = experiment.run(settings, progress=False)
    start = torch.tensor(experiment.START, dtype=torch.float64)
    for task, path in enumerate(result["trajectories"]["STL"]):  # type: ignore[arg-type]
        x = experiment.MINIMA[task]
        end = torch.tensor(path[-1], dtype=torch.float64)
        assert torch.linalg.vector_norm(end - x) < 0.5 * torch.linalg.vector_norm(start - x)
