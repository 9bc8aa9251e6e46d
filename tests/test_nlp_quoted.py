"""The numbers the results page and the README quote in their prose, and the rescoring and
machine-time tables, on runner JSON files written here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.nlp import quoted as Q
from benchmarks.nlp import write_results as W


def _scores(base: float) -> dict[str, dict[str, float]]:
    return {
        "hau": {"f1": base, "f1_truncated": base - 2},
        "yor": {"f1": base + 10, "f1_truncated": base},
    }


def _run(method: str, seed: int, level: float) -> dict[str, Any]:
    curve = [
        {"grad_computations": n, "dev_mean": level * n / 200, "l2_from_pretrained": n / 100,
         "task_grad_cosine": 1 - n / 400 + level / 1000}
        for n in (0, 100, 200)
    ]  # fmt: skip
    point = {"grad_computations": 200, "dev_mean": level, "test": _scores(level)}
    record = {
        "curve": curve, "best_dev": point, "end": point, "l2_from_pretrained_end": 2.0,
        "seconds_per_grad_computation": 0.5, "wall_seconds": 1800.0 + seed, "eval_seconds": 600.0,
    }  # fmt: skip
    config = {"method": method, "seed": seed, "kind": "ner", "lr": 1e-4, "budget": 200, "max_length": 64,
              "eval_scoring": {"mode": "windows"}}  # fmt: skip
    return {"config": config, "runs": {"all": record}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    group = tmp_path / "g"
    group.mkdir()
    levels = {("mtl", 0): 60.0, ("mtl", 1): 64.0, ("mtl", 2): 62.0,
              ("seqreptile", 0): 70.0, ("seqreptile", 1): 71.0}  # fmt: skip
    for (method, seed), level in levels.items():
        (group / f"{method}_seed{seed}.json").write_text(json.dumps(_run(method, seed, level)))
    (group / "summary.json").write_text("{}")  # not a run
    return tmp_path


def test_a_method_over_its_seeds(results: Path) -> None:
    assert Q.value("g/mtl/best_dev", results) == "62.0"
    assert Q.value("g/mtl/best_dev/pm", results) == "62.0 ± 2.0"
    assert Q.value("g/mtl/best_dev/n", results) == "3"
    assert Q.value("g/mtl/best_dev/seeds", results) == "0, 1, 2"
    assert Q.value("g/mtl/best_dev/min", results) == "60.0"
    assert Q.value("g/mtl/l2_end", results) == "2.00"
    assert Q.value("g/mtl/wall_hours/sum", results) == f"{(3 * 1800 + 3) / 3600:.1f}"
    assert Q.value("g/seqreptile_seed1/best_dev", results) == "71.0"  # one file


def test_a_pair_is_paired_by_seed(results: Path) -> None:
    """Seed 2 has no SeqReptile run, so the difference is over seeds 0 and 1 only."""
    assert Q.value("g/seqreptile-mtl/best_dev", results) == "+8.5"
    assert Q.value("g/seqreptile-mtl/best_dev/seeds", results) == "0, 1"
    # differences 10 and 7: mean 8.5, std 2.12, t(0.975, 1 dof) = 12.71
    assert Q.value("g/seqreptile-mtl/best_dev/ci", results) == "[-10.6, +27.6]"
    assert Q.value("g/mtl/best_dev/ci", results) == "[57.0, 67.0]"  # a level: no signs
    assert Q.value("g/mtl-seqreptile/best_dev", results) == "-8.5"


def test_languages_old_scoring_and_curve_points(results: Path) -> None:
    assert Q.value("g/mtl_seed0/test@best_dev", results) == "65.0"  # mean of 60 and 70
    assert Q.value("g/mtl_seed0/test@best_dev:yor", results) == "70.0"
    assert Q.value("g/mtl_seed0/test@end:truncated", results) == "59.0"
    assert Q.value("g/mtl_seed0/test@best_dev:yor:truncated", results) == "60.0"
    assert Q.value("g/mtl_seed0/dev@100", results) == "30.0"
    # the points at >= 100 computations: cosines 0.75 and 0.5, plus 60 / 1000
    assert Q.value("g/mtl_seed0/cosine_from:100", results) == "0.685"
    assert Q.value("g/mtl/lr", results) == "1e-4"


def test_two_runs_of_one_seed_are_refused(results: Path) -> None:
    """A grid (several runs of a method and seed) is selected by file stem, not by method."""
    run = _run("mtl", 0, 99.0)
    (results / "g" / "mtl_again_seed0.json").write_text(json.dumps(run))
    with pytest.raises(KeyError, match="two runs of seed 0"):
        Q.value("g/mtl/best_dev", results)
    assert Q.value("g/mtl_again_seed0/best_dev", results) == "99.0"


def test_cosine_wins_counts_the_paired_points(results: Path) -> None:
    """SeqReptile's cosine is above MTL's at every point (its level is higher): 2 points
    from 100 on, for each of the 2 paired seeds."""
    assert Q.value("g/seqreptile-mtl/cosine_wins_from:100", results) == "4 of 4"
    assert Q.value("g/mtl-seqreptile/cosine_wins_from:0", results) == "0 of 6"


def test_a_pair_at_matched_dev_f1(results: Path) -> None:
    """Dev F1 rises linearly to each run's level at 200 computations, so at the matched
    level (MTL's, the lower) SeqReptile is at 200 * mtl / seqreptile computations."""
    earlier = [200 * mtl / seq - 200 for mtl, seq in ((60.0, 70.0), (64.0, 71.0))]
    assert Q.value("g/seqreptile-mtl/matched:computations", results) == (
        f"{statistics.fmean(earlier):+.0f}"
    )
    # l2 is computations / 100
    assert (
        Q.value("g/seqreptile-mtl/matched:l2", results) == f"{statistics.fmean(earlier) / 100:+.2f}"
    )
    with pytest.raises(KeyError, match="without zero-shot scores"):
        Q.value("g/seqreptile-mtl/matched:zero_shot", results)
    with pytest.raises(KeyError, match="expected matched:l2"):
        Q.value("g/seqreptile-mtl/matched:l2:amh", results)
    for path in (results / "g").glob("*_seed*.json"):  # zero-shot F1 n / 10 (amh), n / 5 (wol)
        run = json.loads(path.read_text())
        for p in run["runs"]["all"]["curve"]:
            n = p["grad_computations"]
            p["zero_shot"] = {"amh": {"f1": n / 10}, "wol": {"f1": n / 5}}
        path.write_text(json.dumps(run))
    shift = statistics.fmean(earlier)
    assert Q.value("g/seqreptile-mtl/matched:zero_shot:amh", results) == f"{shift / 10:+.1f}"
    assert Q.value("g/seqreptile-mtl/matched:zero_shot", results) == f"{shift * 0.15:+.1f}"
    assert Q.value("g/seqreptile-mtl/matched:zero_shot/n", results) == "2"


def test_the_matched_table_and_the_prose_agree(results: Path) -> None:
    runs = list(Q.load_runs(results / "g").values())
    table = W.matched_table(runs, ("seqreptile", "mtl"))
    l2 = Q.value("g/seqreptile-mtl/matched:l2", results)
    assert f"| mean difference (95% CI over seeds) | | | {l2} [" in table


def test_a_run_that_never_rose_has_no_match(results: Path) -> None:
    """SeqReptile seed 2 collapsed: its dev F1 stays at its first point, so the highest level
    both curves reach is where both start; that seed is left out of the matched values and
    marked in the table, while the best-dev difference keeps it."""
    flat = _run("seqreptile", 2, 0.0)
    for p in flat["runs"]["all"]["curve"]:
        p["dev_mean"] = 0.9
    (results / "g" / "seqreptile_seed2.json").write_text(json.dumps(flat))
    runs = list(Q.load_runs(results / "g").values())
    assert Q.never_rose(flat) and not Q.never_rose(runs[0])
    assert Q.value("g/seqreptile-mtl/matched:l2/seeds", results) == "0, 1"
    assert Q.value("g/seqreptile-mtl/best_dev/seeds", results) == "0, 1, 2"
    table = W.matched_table(runs, ("seqreptile", "mtl"))
    assert "| 2 | – (no match: Seq.Reptile never rose above its first evaluation) |" in table
    l2 = Q.value("g/seqreptile-mtl/matched:l2", results)
    assert f"| mean difference (95% CI over seeds) | | | {l2} [" in table
    earlier = [200 * mtl / seq - 200 for mtl, seq in ((60.0, 70.0), (64.0, 71.0))]
    assert l2 == f"{statistics.fmean(earlier) / 100:+.2f}"  # seeds 0 and 1 only


def test_fill_values_uses_the_runs_it_is_given(results: Path) -> None:
    """Runs already loaded are not read again (group ``x`` has no folder)."""
    page = "<!-- v:x/mtl/best_dev -->?<!-- /v -->"
    loaded = {"x": {"mtl_seed0": _run("mtl", 0, 50.0)}}
    assert Q.fill_values(page, results, loaded) == "<!-- v:x/mtl/best_dev -->50.0<!-- /v -->"


def test_a_queued_run_reads_not_run_yet(results: Path) -> None:
    """The campaign queues MTL in ``long_seeds``; nothing queues ``nope`` there."""
    assert Q.value("long_seeds/mtl/best_dev", results) == "not run yet"
    assert Q.value("long_seeds/mtl/best_dev/n", results) == "0"
    assert Q.value("long_seeds/mtl_seed2/best_dev", results) == "not run yet"  # a stem
    assert Q.value("long_seeds/seqreptile-sequential/best_dev/ci", results) == "not run yet"
    with pytest.raises(KeyError, match="'nope'"):
        Q.value("long_seeds/nope/best_dev", results)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("g/mtl/zero_shot@best_dev", "zero_shot@best_dev"),  # no zero-shot scores
        ("g/mtl/dev@150", "dev@150"),  # no such point
        ("g/mtl/nonsense", "nonsense"),
        ("g/mtl/best_dev/median", "median"),
        ("g/stl/best_dev", "no runs of 'stl'"),
        ("absent/mtl/best_dev", "no runs"),
        ("g/mtl_lr1e-4_seed9/best_dev", "no runs"),  # a stem with '-', not a pair
    ],
)
def test_a_number_that_is_not_there_is_an_error(results: Path, key: str, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        Q.value(key, results)


def test_fill_values_rewrites_the_quoted_numbers_only(results: Path) -> None:
    text = "MTL <!-- v:g/mtl/best_dev -->55.5<!-- /v --> (n = <!-- v:g/mtl/best_dev/n -->x<!-- /v -->); 1.0 stays"
    filled = Q.fill_values(text, results)
    assert filled == (
        "MTL <!-- v:g/mtl/best_dev -->62.0<!-- /v --> (n = <!-- v:g/mtl/best_dev/n -->3<!-- /v -->); 1.0 stays"
    )
    assert Q.fill_values(filled, results) == filled


def test_check_fails_on_a_stale_quoted_number(results: Path, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("SeqReptile <!-- v:g/seqreptile/best_dev -->70.0<!-- /v -->\n")
    assert W.main(["--results", str(results), "--pages", str(page), "--check"]) == 1
    assert W.main(["--results", str(results), "--pages", str(page)]) == 0
    assert page.read_text() == "SeqReptile <!-- v:g/seqreptile/best_dev -->70.5<!-- /v -->\n"
    assert W.main(["--results", str(results), "--pages", str(page), "--check"]) == 0


def test_rescoring_table_gives_the_change_of_scoring(results: Path) -> None:
    runs = list(Q.load_runs(results / "g").values())
    table = W.rescoring_table(W.Group("g"), runs)
    mtl = next(line for line in table.splitlines() if line.startswith("| MTL |"))
    new = statistics.fmean([65.0, 69.0, 67.0])  # per seed, the mean of its two languages
    assert mtl == f"| MTL | 3 | test F1 | {new:.1f} | {new - 6:.1f} | +6.0 | hau +2.0, yor +10.0 |"
    assert "cut at 64 sub-words" in table.splitlines()[0]


def test_machine_table_sums_the_wall_time(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "GROUPS", [W.Group("g")])
    table = W.machine_table(W.load_groups(results))
    assert f"| g | 5 | {(5 * 1800 + 4) / 3600:.1f} | 30 | 33 % |" in table
    stl = _run("stl", 0, 50.0)  # one model per task: one record each, one run in all
    stl["runs"] = {"hau": stl["runs"]["all"], "yor": stl["runs"]["all"]}
    (results / "g" / "stl_seed0.json").write_text(json.dumps(stl))
    table = W.machine_table(W.load_groups(results))
    assert f"| g | 6 | {(7 * 1800 + 4) / 3600:.1f} | 30 | 33 % |" in table
    copies = results / "h"  # a later group holding copies of g's runs and one of its own
    copies.mkdir()
    for name in ("mtl_seed0", "stl_seed0"):
        (copies / f"{name}.json").write_text((results / "g" / f"{name}.json").read_text())
    (copies / "mtl_seed5.json").write_text(json.dumps(_run("mtl", 5, 1.0)))
    monkeypatch.setattr(W, "GROUPS", [W.Group("g"), W.Group("h")])
    assert f"| h | 1 | {1805 / 3600:.1f} | 30 | 33 % |" in W.machine_table(W.load_groups(results))


def test_the_shape_of_a_dev_curve(results: Path) -> None:
    """A curve that peaks at 100 computations, dips by 3 F1 and comes back to within 1 F1
    of its best only at the last point."""
    run = _run("sequential", 0, 80.0)
    run["config"]["budget"] = 400
    run["runs"]["all"]["curve"] = [
        {"grad_computations": n, "dev_mean": dev, "l2_from_pretrained": 0.0}
        for n, dev in zip((0, 100, 200, 300, 400), (10.0, 80.0, 79.5, 77.0, 79.2), strict=True)
    ]
    (results / "g" / "sequential_seed0.json").write_text(json.dumps(run))
    assert Q.plateau(run) == {
        "best_dev": 80.0, "best_dev_at": 100, "stays_from": 400, "fall_after_best": 3.0,
        "end_below_best": pytest.approx(0.8), "best_first_half": 80.0, "best_second_half": 79.2,
    }  # fmt: skip
    assert Q.value("g/sequential_seed0/stays_from", results) == "400"
    assert Q.value("g/sequential/fall_after_best/max", results) == "3.0"
    assert Q.value("g/sequential_seed0/best_second_half", results) == "79.2"
    table = W.plateau_table([run])
    assert table.splitlines()[-1] == "| Sequential | 0 | 80.0 | 100 | 400 | 3.0 | 80.0 / 79.2 |"


def test_the_shape_of_one_languages_dev_curve(results: Path) -> None:
    """``FIELD:LANG`` reads LANG's own dev F1: yor falls after its best while the mean rises."""
    run = _run("mtl", 0, 80.0)
    for p, yor in zip(run["runs"]["all"]["curve"], (10.0, 60.0, 57.5), strict=True):
        p["dev"] = {"yor": {"f1": yor}, "swa": {"f1": p["dev_mean"]}}
    (results / "g" / "mtl_seed0.json").write_text(json.dumps(run))
    assert Q.value("g/mtl_seed0/end_below_best", results) == "0.0"
    assert Q.value("g/mtl_seed0/end_below_best:yor", results) == "2.5"
    assert Q.value("g/mtl_seed0/best_second_half:swa", results) == "80.0"
    with pytest.raises(KeyError, match="no dev language 'amh'"):
        Q.value("g/mtl_seed0/end_below_best:amh", results)


def test_a_curve_that_ends_more_than_1_f1_below_its_best(results: Path) -> None:
    run = _run("sequential", 0, 80.0)
    run["runs"]["all"]["curve"][-1]["dev_mean"] = 30.0  # the best is at 100 computations: 40
    assert Q.plateau(run)["stays_from"] is None
    assert Q.plateau(run)["end_below_best"] == 10.0
    assert "| 40.0 | 100 | – (ends lower) | 10.0 |" in W.plateau_table([run])
    (results / "g" / "sequential_seed0.json").write_text(json.dumps(run))
    with pytest.raises(KeyError, match="stays_from"):
        Q.value("g/sequential_seed0/stays_from", results)
