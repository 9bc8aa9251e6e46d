"""The tables and quoted numbers of ``docs/results.md`` and the README, written from the
runner's JSON files.

    python -m benchmarks.nlp.write_results [--results benchmarks/results/nlp] [--check]

The results page holds generated regions, each between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``; this command replaces every region's content by the table NAME
computed from the JSON files, rewrites every number quoted in the prose of both pages
(:mod:`benchmarks.nlp.quoted`), and writes all tables, also those the page has no region
for yet, to ``<results>/all_tables.md``. ``--check`` writes nothing and exits with status 1
when a page is not up to date (it does not redraw the figures: without ``--check`` the
command also rewrites each group's ``summary.{json,md}`` and ``curves.png``, as
:mod:`benchmarks.nlp.report` does).

Tables, for each campaign group ``G`` of :data:`GROUPS` (folder ``<results>/G``):

* ``G``: :mod:`benchmarks.nlp.report`'s summary (mean ± std over seeds), and a line saying
  how the runs were scored and with which learning rates;
* ``G-best_dev`` / ``G-end``: :mod:`benchmarks.nlp.tables`' per-language tables, test and
  zero-shot sets, at the best dev point / at the end;
* ``G-paired``: for each pair (A, B) of the group, per language and for the average, the
  difference A - B paired by seed, with a 95 % t interval over seeds and a 95 % paired
  bootstrap interval over sentences (runs from issue 17 on record per-sentence entity
  counts; older ones lack them: "unavailable");
* ``G-matched``: each pair at matched training-language dev F1: per seed, the highest dev
  F1 both curves reach (the lower of their two best), the first point at which each curve
  reaches it (linear interpolation between evaluation points), and there the l2 distance
  from the pretrained encoder and the zero-shot F1 (only for runs made with
  ``--curve-zero-shot``); a seed where a run never rose above its first evaluation (it
  collapsed) has no match and is left out of the mean;
* ``G-plateau``: per run, the best dev F1, from which point on the curve stays within 1 F1
  of it, its largest fall after the best point, and the best dev F1 of each half;
* ``G-rescoring``: how far scoring every word moved F1 from the old scoring of the same
  predictions (runs from issue 17 on);
* ``lr`` (the tuning grid, instead of the above): best dev F1 per method and learning
  rate, and the rate chosen;

and ``runs`` (which campaign runs are done), ``machine`` (core-hours of the timed runs) and
``speed`` (the table of :mod:`benchmarks.nlp.measure_speed`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.nlp import campaign, report
from benchmarks.nlp import tables as TB
from benchmarks.nlp.quoted import (
    Loaded,
    at_matched_dev,
    fill_values,
    format_interval,
    load_runs,
    matched_level,
    never_rose,
    one_model_curve,
    paired_seeds,
    plateau,
    seed_interval,
    zero_shot_langs,
)
from benchmarks.nlp.report import mean_zero_shot
from benchmarks.nlp.run import main_metric

RESULTS = TB.RESULTS
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "docs" / "results.md", ROOT / "README.md"]
SPEED = RESULTS.parent / "nlp_speed.md"
BOOTSTRAP_SAMPLES = 2000
Run = dict[str, Any]
Pair = tuple[str, str]

HEADLINE_PAIRS: tuple[Pair, ...] = (("seqreptile", "sequential"), ("seqreptile", "mtl"))


@dataclass(frozen=True)
class Group:
    """A campaign group's tables: per-language tables at ``at``, ``pairs`` compared at
    ``paired_at``."""

    name: str
    task: str = "masakhaner"
    at: tuple[str, ...] = ("best_dev",)
    pairs: tuple[Pair, ...] = HEADLINE_PAIRS
    paired_at: tuple[str, ...] = ("best_dev",)


GROUPS = [
    Group("sweep", at=(), pairs=()),  # three settings of one method, not seeds
    Group("balanced"),
    Group("imbalanced"),
    Group("long", at=("best_dev", "end")),
    Group("wikiann", task="wikiann"),
    Group("lr", pairs=()),
    Group("tuned"),
    Group("same_lr"),
    Group("long_seeds", at=("best_dev", "end")),
    Group("tuned_baselines", pairs=()),
    Group("tuned_wikiann", task="wikiann"),
    Group("tuned_imbalanced"),
]


# ------------------------------------------------------------------------ helpers
def _name(method: str) -> str:
    return TB.ROW_NAMES.get(method, method)


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def parse_counts(text: str) -> np.ndarray:
    """The runner's per-sentence ``correct/gold/predicted`` entity counts as an (n, 3) array."""
    return np.array([[int(x) for x in cell.split("/")] for cell in text.split()], dtype=np.int64)


def bootstrap_f1_differences(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``samples`` paired bootstrap replicates of mean over seeds of F1(A) - F1(B) (percent).

    ``pairs``: per seed, the (n, 3) count arrays of A and B on the same n sentences. Each
    replicate draws n sentences with replacement, the same ones for every seed and both
    methods, and recomputes the micro F1 = 2 * correct / (gold + predicted) of each.
    """
    n = len(pairs[0][0])
    index = rng.integers(0, n, size=(samples, n))

    def f1(counts: np.ndarray) -> np.ndarray:
        c, g, p = (counts[:, k][index].sum(axis=1) for k in range(3))
        return np.where(c > 0, 200.0 * c / np.maximum(g + p, 1), 0.0)

    replicates: np.ndarray = np.stack([f1(a) - f1(b) for a, b in pairs]).mean(axis=0)
    return replicates


# --------------------------------------------------------------------------- tables
def scoring(config: dict[str, Any]) -> str:
    """How one run was scored and on which data caps, from its JSON config."""
    caps = ""
    if "eval_scoring" in config:
        dev, test = config["max_eval_examples"], config["max_test_examples"]
        caps = (
            f"dev {'capped at ' + str(dev) if dev else 'all'} and test "
            f"{'capped at ' + str(test) if test else 'all'} sentences per language"
        )
        s = config["eval_scoring"]
        if s["mode"] == "windows" and config["kind"] == "ner":
            return (
                f"every word scored (windows of {s['window']} tokens, stride {s['stride']}), {caps}"
            )
        return f"{s['mode']} (window/length {s.get('window', s.get('max_length'))}), {caps}"
    if config["kind"] == "ner":
        return (
            f"sentences cut at {config['max_length']} sub-words, the cut-off words counted "
            "as O (runner before issue 17, which did not record the data caps)"
        )
    return "runner before issue 17 (data caps not recorded)"


def provenance(runs: list[Run]) -> str:
    """One line: the learning rates and the scoring of a group's runs."""
    rates: dict[str, set[float]] = {}
    for r in runs:
        rates.setdefault(_name(r["config"]["method"]), set()).add(r["config"]["lr"])
    every = {lr for v in rates.values() for lr in v}
    if len(every) == 1:
        lr_text = f"learning rate {report.rate(min(every))}"
    else:
        lr_text = "learning rates " + ", ".join(
            f"{name} {'/'.join(report.rate(x) for x in sorted(v))}" for name, v in rates.items()
        )
    kinds: dict[str, int] = {}
    for r in runs:
        kinds[scoring(r["config"])] = kinds.get(scoring(r["config"]), 0) + 1
    scored = "; ".join(
        f"{text} ({n} runs)" if len(kinds) > 1 else text for text, n in kinds.items()
    )
    return f"*{len(runs)} runs; {lr_text}; scored: {scored}.*"


def summary_table(runs: list[Run]) -> str:
    """The group's summary table (:func:`benchmarks.nlp.report.markdown`) and its provenance."""
    text = report.markdown(report.summarise(report.by_label(runs)))
    return text.split("\n\n")[0] + "\n\n" + provenance(runs)


def per_language(group: Group, runs: list[Run], at: str) -> str:
    """The per-language tables at ``at``: test sets, and zero-shot sets where there are any."""
    splits: list[str | None] = [None]
    if group.task == "masakhaner" and any(r["preset"]["zero_shot_langs"] for r in runs):
        splits.append("zero_shot")
    parts = [TB.table(group.task, runs, at, split).replace("### ", "#### ", 1) for split in splits]
    return "\n\n".join(parts)


def _split_title(split: str) -> str:
    return {"test": "test F1", "zero_shot": "zero-shot F1"}[split]


def paired_table(task: str, runs: list[Run], pair: Pair, split: str, at: str) -> str:
    """Per-language differences A - B of one split at ``at``, paired by seed (the
    bootstrap seeded per table, so that each table reproduces on its own)."""
    rng = np.random.default_rng(0)
    seeds = paired_seeds(runs, pair)
    metric = main_metric(runs[0]["config"]["kind"])
    scores = [tuple(TB.scores_by_language(r, at, split) for r in (ra, rb)) for _, ra, rb in seeds]
    common = set.intersection(*(set(sa) & set(sb) for sa, sb in scores)) if scores else set()
    if not common:
        return ""
    langs = TB.language_columns(task, common)

    def counts(run: Run, lang: str) -> np.ndarray | None:
        rec = run["runs"]["all"]
        text = (rec.get(at) or rec["end"]).get("sentences", {}).get(split, {}).get(lang)
        return None if text is None else parse_counts(text)

    replicates: dict[str, np.ndarray | None] = {}
    for lang in langs:
        found = [(counts(ra, lang), counts(rb, lang)) for _, ra, rb in seeds]
        both = [(a, b) for a, b in found if a is not None and b is not None]
        sizes = {len(a) for a, _ in both} | {len(b) for _, b in both}
        complete = len(both) == len(found) and len(sizes) == 1  # the same sentences
        replicates[lang] = (
            bootstrap_f1_differences(both, BOOTSTRAP_SAMPLES, rng) if complete else None
        )
    a_name, b_name = (_name(m) for m in pair)
    where = "at the best dev point" if at == "best_dev" else "at the end"
    lines = [
        f"#### {a_name} - {b_name}, {_split_title(split)} {where} (paired by seed, n = "
        f"{len(seeds)}; seeds {', '.join(str(s) for s, _, _ in seeds)})",
        "",
        f"| language | {a_name} | {b_name} | difference | 95% CI over seeds "
        "| 95% CI, bootstrap over sentences |",
        "|---|---|---|---|---|---|",
    ]
    for lang in [*langs, "Avg."]:
        pick = langs if lang == "Avg." else [lang]
        a = [statistics.fmean(sa[x][metric] for x in pick) for sa, _ in scores]
        b = [statistics.fmean(sb[x][metric] for x in pick) for _, sb in scores]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        reps = [r for r in (replicates[x] for x in pick) if r is not None]
        if len(reps) == len(pick):
            mean_rep = np.stack(reps).mean(axis=0)
            boot = format_interval(*np.percentile(mean_rep, [2.5, 97.5]).tolist())
        else:
            boot = "unavailable (no per-sentence counts in these JSONs)"
        lines.append(
            f"| {lang} | {statistics.fmean(a):.1f} | {statistics.fmean(b):.1f} | "
            f"{_signed(statistics.fmean(diffs))} | {seed_interval(diffs)} | {boot} |"
        )
    return "\n".join(lines)


def matched_table(runs: list[Run], pair: Pair) -> str:
    """The pair at matched dev F1 (module docstring), per seed and on average."""
    seeds = paired_seeds(runs, pair)
    if not seeds:
        return ""
    metric = main_metric(runs[0]["config"]["kind"])
    a_name, b_name = (_name(m) for m in pair)
    lines = [
        f"#### {a_name} vs {b_name} at matched dev F1 (the highest dev F1 both curves reach; "
        "the first point reaching it, interpolated)",
        "",
        f"| seed | matched dev F1 | grad. comp. {a_name} / {b_name} | l2 from pretrained "
        f"{a_name} / {b_name} | zero-shot F1 {a_name} / {b_name} | zero-shot difference |",
        "|---|---|---|---|---|---|",
    ]
    l2_diffs: list[float] = []
    zs_diffs: list[float] = []
    per_lang: dict[str, list[float]] = {}
    for seed, ra, rb in seeds:
        if flat := [_name(m) for m, r in zip(pair, (ra, rb), strict=True) if never_rose(r)]:
            lines.append(f"| {seed} | – (no match: {' and '.join(flat)} never rose above its "
                         "first evaluation) | | | | |")  # fmt: skip
            continue
        level = matched_level(ra, rb)
        langs = zero_shot_langs(ra, rb)
        groups = [] if langs is None else [langs, *([lang] for lang in langs)]
        zero_shot = [partial(mean_zero_shot, langs=group, metric=metric) for group in groups]
        steps, l2, *zs = at_matched_dev(
            ra, rb, lambda p: p["grad_computations"], lambda p: p["l2_from_pretrained"], *zero_shot
        )
        l2_diffs.append(l2[0] - l2[1])
        zs_text = diff_text = "unavailable"
        if langs is not None:
            (zsa, zsb), *by_lang = zs
            zs_diffs.append(zsa - zsb)
            zs_text, diff_text = f"{zsa:.1f} / {zsb:.1f}", _signed(zsa - zsb)
            for lang, (la, lb) in zip(langs, by_lang, strict=True):
                per_lang.setdefault(lang, []).append(la - lb)
        lines.append(
            f"| {seed} | {level:.1f} | {steps[0]:.0f} / {steps[1]:.0f} | "
            f"{l2[0]:.2f} / {l2[1]:.2f} | {zs_text} | {diff_text} |"
        )
    if not l2_diffs:
        return "\n".join(lines)
    complete = len(zs_diffs) == len(l2_diffs)
    zs_mean = (
        f"{_signed(statistics.fmean(zs_diffs))} {seed_interval(zs_diffs)}"
        if complete
        else "unavailable"
    )
    lines.append(
        f"| mean difference (95% CI over seeds) | | | "
        f"{statistics.fmean(l2_diffs):+.2f} {seed_interval(l2_diffs)} | | {zs_mean} |"
    )
    if not complete:
        lines += [
            "",
            "Zero-shot F1 at matched dev F1: unavailable, these runs did not score the "
            "zero-shot sets along the curve (the runner's `--curve-zero-shot`; the "
            "`long_seeds` runs did).",
        ]
        return "\n".join(lines)
    lines += ["", "| zero-shot language | difference at matched dev F1 | 95% CI over seeds |"]
    lines.append("|---|---|---|")
    for lang, diffs in per_lang.items():
        lines.append(f"| {lang} | {_signed(statistics.fmean(diffs))} | {seed_interval(diffs)} |")
    return "\n".join(lines)


def plateau_table(runs: list[Run]) -> str:
    """Per run: best dev F1 and where, the point from which the curve stays within 1 F1 of
    it, its largest fall after the best point, and the best dev F1 of each half."""
    lines = [
        "| method | seed | best dev F1 | at | within 1 F1 of it from | largest fall after it "
        "| best dev F1, first half / second half |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(TB.ROW_NAMES)
    for r in sorted(runs, key=lambda r: (order.index(r["config"]["method"]), r["config"]["seed"])):
        if "all" not in r["runs"]:
            continue
        shape = plateau(r)
        stays = "– (ends lower)" if shape["stays_from"] is None else f"{shape['stays_from']:.0f}"
        lines.append(
            f"| {report.label(r['config'])} | {r['config']['seed']} | {shape['best_dev']:.1f} | "
            f"{shape['best_dev_at']:.0f} | {stays} | "
            f"{shape['fall_after_best']:.1f} | {shape['best_first_half']:.1f} / "
            f"{shape['best_second_half']:.1f} |"
        )
    return "\n".join(lines)


def lr_table(runs: list[Run]) -> str:
    """Best dev F1 of each (method, learning rate) of the tuning grid; the rate chosen is
    the best one (ties: the smaller rate), as :func:`benchmarks.nlp.campaign.chosen_lr`."""
    lines = ["| method | learning rate | seed | best dev F1 | at (grad. comp.) | chosen |"]
    lines.append("|---|---|---|---|---|---|")
    for method in TB.ROW_NAMES:
        mine = sorted(
            (r for r in runs if r["config"]["method"] == method), key=lambda r: r["config"]["lr"]
        )
        if not mine:
            continue
        best = [max(p["dev_mean"] for p in one_model_curve(r)) for r in mine]
        chosen = best.index(max(best))
        for i, r in enumerate(mine):
            point = max(one_model_curve(r), key=lambda p: p["dev_mean"])
            lines.append(
                f"| {_name(method)} | {report.rate(r['config']['lr'])} | {r['config']['seed']} | "
                f"{best[i]:.1f} | {point['grad_computations']} | {'yes' if i == chosen else ''} |"
            )
    return "\n".join(lines)


def rescoring_table(group: Group, runs: list[Run], at: str = "best_dev") -> str:
    """How much scoring every word moved the levels: per method and split, F1 at ``at``
    under the scoring of issue 17 minus F1 of the same predictions cut at the training
    length (``f1_truncated``), per language and on average (mean over seeds)."""
    scored = [r for r in runs if "eval_scoring" in r["config"] and r["config"]["kind"] == "ner"]
    cut = "/".join(str(n) for n in sorted({r["config"]["max_length"] for r in scored}))
    rows = []
    for method in TB.ROW_NAMES:
        mine = [r for r in scored if r["config"]["method"] == method]
        for split in ("test", "zero_shot"):
            per_run = [TB.scores_by_language(r, at, split) for r in mine]
            if not per_run or not all(per_run):
                continue
            langs = TB.language_columns(group.task, set(per_run[0]))

            def mean(name: str, pick: list[str], per_run: list[Any] = per_run) -> float:
                return statistics.fmean(
                    statistics.fmean(scores[x][name] for x in pick) for scores in per_run
                )

            new, old = mean("f1", langs), mean("f1_truncated", langs)
            changes = [_signed(mean("f1", [x]) - mean("f1_truncated", [x])) for x in langs]
            rows.append(
                f"| {_name(method)} | {len(mine)} | {_split_title(split)} | {new:.1f} | "
                f"{old:.1f} | {_signed(new - old)} | "
                + ", ".join(f"{x} {c}" for x, c in zip(langs, changes, strict=True))
                + " |"
            )
    if not rows:
        return "No runs scored on every word in this group."
    where = "at the best dev point" if at == "best_dev" else "at the end"
    return "\n".join(
        [
            f"| method | seeds | split | F1, every word ({where}) | F1 of the same predictions, "
            f"cut at {cut} sub-words | change "
            "| change per language |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def machine_table(loaded: Loaded) -> str:
    """Machine time of the runs that record it (``wall_seconds``, from issue 17 on), per
    group, a copied run only where it was made: each run used one core, so hours of runs
    are core-hours."""
    lines = [
        "| group | runs timed | core-hours | minutes per run (median) | of which evaluation |",
        "|---|---|---|---|---|",
    ]
    made: set[str] = set()  # a run copied into a later group (same_lr) is counted once
    for group in GROUPS:
        timed = []  # per JSON, over its records (STL: one per task)
        for r in loaded[group.name].values():
            recs = list(r["runs"].values())
            if all("wall_seconds" in rec for rec in recs):
                identity = json.dumps([r["config"], [rec["wall_seconds"] for rec in recs]])
                if identity not in made:
                    made.add(identity)
                    timed.append(recs)
        if not timed:
            continue
        wall = [sum(rec["wall_seconds"] for rec in recs) for recs in timed]
        evaluation = sum(rec["eval_seconds"] for recs in timed for rec in recs) / sum(wall)
        lines.append(
            f"| {group.name} | {len(timed)} | {sum(wall) / 3600:.1f} | "
            f"{statistics.median(wall) / 60:.0f} | {100 * evaluation:.0f} % |"
        )
    return "\n".join(lines) if len(lines) > 2 else "No run records its wall time yet."


def runs_table(results: Path) -> str:
    """Which runs of the campaign have a JSON file, per group."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for job in campaign.jobs():
        done, left = groups.setdefault(job.group, ([], []))
        (done if (results / job.group / f"{job.name}.json").exists() else left).append(
            job.name.replace("_seed", " s")
        )
    lines = ["| group | done (JSON committed) | not run yet |", "|---|---|---|"]
    for group, (done, left) in groups.items():
        lines.append(f"| {group} | {', '.join(done) or '–'} | {', '.join(left) or '–'} |")
    return "\n".join(lines)


def speed_table(path: Path) -> str:
    """The table of :mod:`benchmarks.nlp.measure_speed`'s markdown file."""
    if not path.exists():
        return "No speed measurement yet (`python -m benchmarks.nlp.measure_speed`)."
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("|"))


def group_tables(group: Group, runs: list[Run]) -> dict[str, str]:
    """Every table of one group (its runs: ``runs``), by region name."""
    if not runs:
        empty = f"No runs yet: `python -m benchmarks.nlp.campaign --group {group.name}`."
        names = [group.name]
        if group.name != "lr":
            names += [f"{group.name}-{at}" for at in group.at]
            kinds = ("paired", "matched", "plateau", "rescoring")
            names += [f"{group.name}-{kind}" for kind in kinds]
        return dict.fromkeys(names, empty)
    if group.name == "lr":  # a grid, not seeds of one setting: its own table
        return {"lr": lr_table(runs)}
    out = {group.name: summary_table(runs)}
    for at in group.at:
        out[f"{group.name}-{at}"] = per_language(group, runs, at)
    paired, matched = [], []
    for pair in group.pairs:
        for at in group.paired_at:
            for split in ("test", "zero_shot"):
                paired.append(paired_table(group.task, runs, pair, split, at))
        matched.append(matched_table(runs, pair))
    out[f"{group.name}-paired"] = "\n\n".join(t for t in paired if t) or "No pairs run."
    out[f"{group.name}-matched"] = "\n\n".join(t for t in matched if t) or "No pairs run."
    out[f"{group.name}-plateau"] = plateau_table(runs)
    out[f"{group.name}-rescoring"] = rescoring_table(group, runs)
    return out


def load_groups(results: Path) -> Loaded:
    """group -> file stem -> run, for every group of :data:`GROUPS` (empty: no folder)."""
    return {
        g.name: load_runs(results / g.name) if (results / g.name).is_dir() else {} for g in GROUPS
    }


def all_tables(results: Path, loaded: Loaded) -> dict[str, str]:
    """Every table of the page, by region name (module docstring), from the runs
    ``loaded`` (:func:`load_groups`) of ``results``."""
    out: dict[str, str] = {}
    for group in GROUPS:
        out.update(group_tables(group, list(loaded[group.name].values())))
    out["runs"] = runs_table(results)
    out["machine"] = machine_table(loaded)
    out["speed"] = speed_table(results.parent / SPEED.name)
    return out


REGION = re.compile(
    r"^(?P<indent>[ \t]*)<!-- results:(?P<name>[\w-]+) -->\n.*?^(?P=indent)<!-- /results:(?P=name) -->$",
    re.M | re.S,
)


def fill(page: str, tables: dict[str, str]) -> str:
    """``page`` with every generated region's content replaced by its table (indented as
    the region's markers, with a blank line on either side)."""

    def replace(match: re.Match[str]) -> str:
        name, indent = match["name"], match["indent"]
        if name not in tables:
            raise KeyError(f"the page's region {name!r} is no table of write_results")
        body = [indent + line if line else "" for line in tables[name].strip("\n").split("\n")]
        return "\n".join(
            [f"{indent}<!-- results:{name} -->", "", *body, "", f"{indent}<!-- /results:{name} -->"]
        )

    return REGION.sub(replace, page)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the group folders")
    ap.add_argument("--pages", type=Path, nargs="+", default=PAGES)
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = ap.parse_args(argv)
    loaded = load_groups(args.results)
    tables = all_tables(args.results, loaded)
    stale = []
    for path in args.pages:
        page = path.read_text()
        new = fill_values(fill(page, tables), args.results, loaded)
        if new != page:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check:
        for path in stale:
            print(f"{path} is out of date: python -m benchmarks.nlp.write_results")
        return 1 if stale else 0
    for group in GROUPS:  # each group's summary files and figure (report's)
        folder = args.results / group.name
        if runs := report.by_label(loaded[group.name].values()):
            summary = json.dumps(report.summarise(runs), indent=1)
            old = folder / "summary.json"
            if old.exists() and old.read_text() == summary and (folder / "curves.png").exists():
                continue  # the same runs: the figure would only differ in its bytes
            old.write_text(summary)
            (folder / "summary.md").write_text(report.markdown(json.loads(summary)))
            report.figure(runs, folder / "curves.png", group.name)
    everything = "\n\n".join(f"## {name}\n\n{text}" for name, text in tables.items())
    (args.results / "all_tables.md").write_text(
        "# Every table of write_results (generated; see docs/results.md)\n\n" + everything + "\n"
    )
    print(f"wrote {', '.join(map(str, stale)) or 'no page (all up to date)'} and "
          f"{args.results / 'all_tables.md'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
