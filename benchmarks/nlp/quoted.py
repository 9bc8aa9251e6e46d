"""The numbers quoted in the prose of ``docs/results.md`` and the README, computed from the
runner's JSON files.

Prose quotes a number as ``<!-- v:KEY -->67.9<!-- /v -->`` (the comments do not show when
the page is rendered). :func:`fill_values` rewrites the text between the markers with
:func:`value` of KEY, so ``python -m benchmarks.nlp.write_results`` updates the prose with
the tables, and its ``--check`` fails when a quoted number no longer follows from the JSON.

KEY is ``GROUP/SELECTION/QUANTITY[/STATISTIC]``:

* GROUP: a folder of the results (a campaign group);
* SELECTION: a file stem (that run), a method (its runs in the group, one per seed), or
  ``A-B`` for two methods: A's value minus B's, paired by seed over the seeds both have;
* QUANTITY of one run: a field of :func:`benchmarks.nlp.report.summarise_run` (``best_dev``,
  ``best_dev_at``, ``test_at_best``, ``zero_shot_at_end``, ``l2_end``, ...);
  ``SPLIT@AT[:LANG][:truncated]`` with SPLIT ``test`` or ``zero_shot`` and AT ``best_dev``
  or ``end``: the mean F1 over the split's languages (or LANG's), ``:truncated`` the F1 of
  the same predictions under the scoring before issue 17; ``cosine_from:N``: the mean
  task-gradient cosine of the curve points at N computations or more; ``dev@N``: mean dev
  F1 at N computations; ``stays_from``, ``fall_after_best``, ``end_below_best``,
  ``best_first_half``, ``best_second_half``: the shape of the dev curve (:func:`plateau`;
  ``FIELD:LANG``: of LANG's dev F1);
  ``wall_hours``: the run's wall time; ``lr``: its learning rate;
  for a pair only, ``cosine_wins_from:N``: at how many of the evaluation points at N
  computations or more (over all paired seeds) A's task-gradient cosine is above B's, and
  ``matched:WHAT``, A's minus B's WHAT at matched dev F1 (per seed, where each curve first
  reaches the highest mean dev F1 both reach, interpolated; a seed where either run never
  rose above its first evaluation is left out): ``l2`` (from the pretrained encoder),
  ``computations``, ``zero_shot[:LANG]`` (runs with ``--curve-zero-shot``);
* STATISTIC over the selected runs: ``mean`` (the default), ``pm`` (mean ± std), ``min``,
  ``max``, ``sum``, ``n`` (how many runs), ``ci`` (95 % t interval of the mean, over
  seeds), ``seeds``.

A selection the campaign has queued but not run yet reads ``not run yet`` (its ``n``:
``0``); any other KEY that does not resolve is an error.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.nlp import report
from benchmarks.nlp import tables as TB
from benchmarks.nlp.report import mean_zero_shot
from benchmarks.nlp.run import main_metric

Run = dict[str, Any]
Point = dict[str, Any]  # a curve point
Loaded = dict[str, dict[str, Run]]  # group -> file stem -> run
Pair = tuple[str, str]
MARKER = re.compile(r"<!-- v:(?P<key>\S+) -->[^\n]*?<!-- /v -->")
# the language is optional and lazy (``??``), so that ``test@end:truncated`` is no language
SPLIT_AT = re.compile(r"(?P<split>test|zero_shot)@(?P<at>best_dev|end)(?::(?P<lang>[a-z]+))??"
                      r"(?P<truncated>:truncated)?")  # fmt: skip
SUMMARY_FIELDS = {key for key, _ in report.KEYS}


def load_runs(folder: Path) -> dict[str, Run]:
    """File stem -> runner JSON of a folder (not ``summary.json``), ordered by file name."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return {stem: r for stem, r in runs.items() if "runs" in r}


def by_seed(runs: Sequence[Run], method: str) -> dict[int, Run]:
    """seed -> the run of ``method``; ``KeyError`` if two runs share a seed (a grid such as
    the ``lr`` group: select its runs by file stem)."""
    out: dict[int, Run] = {}
    for r in runs:
        if r["config"]["method"] == method:
            if r["config"]["seed"] in out:
                raise KeyError(f"{method!r} has two runs of seed {r['config']['seed']}")
            out[r["config"]["seed"]] = r
    return out


def paired_seeds(runs: Sequence[Run], pair: Pair) -> list[tuple[int, Run, Run]]:
    """``(seed, run of A, run of B)`` for the seeds both methods of ``pair`` have."""
    a, b = (by_seed(runs, m) for m in pair)
    return [(s, a[s], b[s]) for s in sorted(set(a) & set(b))]


def format_interval(lo: float, hi: float, digits: int = 1, signed: bool = True) -> str:
    """``[lo, hi]``, with signs for differences."""
    sign = "+" if signed else ""
    return f"[{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def seed_interval(values: Sequence[float], digits: int = 1, signed: bool = True) -> str:
    """95 % t interval of the mean of per-seed values (``– (one seed)`` with one seed)."""
    if len(values) < 2:
        return "– (one seed)"
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return format_interval(mean - half, mean + half, digits, signed)


def crossing(values: Sequence[float], level: float) -> tuple[int, float] | None:
    """Where a curve first reaches ``level``: ``(i, w)`` with the crossing at
    ``(1 - w) * point[i - 1] + w * point[i]`` (``(0, 1.0)``: at the first point); ``None``
    when it never does."""
    for i, value in enumerate(values):
        if value >= level:
            if i == 0:
                return 0, 1.0
            return i, (level - values[i - 1]) / (value - values[i - 1])
    return None


def at_crossing(values: Sequence[float], where: tuple[int, float]) -> float:
    """A curve's value (e.g. l2, zero-shot F1) at a :func:`crossing`."""
    i, w = where
    return values[i] if i == 0 else (1 - w) * values[i - 1] + w * values[i]


def one_model_curve(run: Run) -> list[Point]:
    """The curve of a run that trains one model (every method but STL)."""
    if "all" not in run["runs"]:
        raise KeyError("a curve of one model is needed (not STL's one per task)")
    return list(run["runs"]["all"]["curve"])


def zero_shot_langs(a: Run, b: Run) -> list[str] | None:
    """The zero-shot languages scored at every point of both curves (``--curve-zero-shot``),
    else ``None``."""
    points = one_model_curve(a) + one_model_curve(b)
    if not all(p.get("zero_shot") for p in points):
        return None
    return sorted(points[0]["zero_shot"])


def matched_level(a: Run, b: Run) -> float:
    """The highest mean dev F1 both runs' curves reach: the lower of their two best."""
    return min(max(p["dev_mean"] for p in one_model_curve(r)) for r in (a, b))


def never_rose(run: Run) -> bool:
    """Whether a run's dev F1 never rose above its first evaluation (a run that collapsed
    from the start): matched with it, the other run would be compared at its own start."""
    dev = [p["dev_mean"] for p in one_model_curve(run)]
    return max(dev) <= dev[0]


def at_matched_dev(a: Run, b: Run, *gets: Callable[[Point], float]) -> list[tuple[float, float]]:
    """Each ``get`` of the curves of ``a`` and ``b`` where each first reaches
    :func:`matched_level` (interpolated between evaluation points): one ``(a, b)`` pair per
    getter, the crossings found once."""
    level = matched_level(a, b)
    crossings = []
    for run in (a, b):
        curve = one_model_curve(run)
        where = crossing([p["dev_mean"] for p in curve], level)
        assert where is not None  # each curve reaches the lower of the two maxima
        crossings.append((curve, where))
    (curve_a, where_a), (curve_b, where_b) = crossings
    return [
        (at_crossing([get(p) for p in curve_a], where_a),
         at_crossing([get(p) for p in curve_b], where_b))
        for get in gets
    ]  # fmt: skip


def plateau(run: Run, lang: str | None = None) -> dict[str, float | None]:
    """Of a run's one-model curve of mean dev F1 (of ``lang``'s dev F1, if given):
    ``best_dev`` and ``best_dev_at``;
    ``stays_from``, the computations from which the curve stays within 1 F1 of its best
    (``None`` when its last point is lower); ``fall_after_best``, its largest fall after the
    best point; ``end_below_best``, how far its last point is below the best;
    ``best_first_half`` and ``best_second_half``, the best dev F1 of each half of the
    budget."""
    curve = one_model_curve(run)
    metric = main_metric(run["config"]["kind"])
    dev = [p["dev"][lang][metric] if lang else p["dev_mean"] for p in curve]
    at = [p["grad_computations"] for p in curve]
    best = max(range(len(dev)), key=lambda i: dev[i])
    start = len(dev)
    while start > 0 and dev[start - 1] >= dev[best] - 1:
        start -= 1
    half = run["config"]["budget"] / 2
    return {
        "best_dev": dev[best],
        "best_dev_at": at[best],
        "stays_from": at[start] if start < len(dev) else None,
        "fall_after_best": dev[best] - min(dev[best:]),
        "end_below_best": dev[best] - dev[-1],
        "best_first_half": max(d for d, x in zip(dev, at, strict=True) if x <= half),
        "best_second_half": max(d for d, x in zip(dev, at, strict=True) if x > half),
    }


PLATEAU_FIELDS = {
    "stays_from", "fall_after_best", "end_below_best", "best_first_half", "best_second_half"
}  # fmt: skip


def matched_value(a: Run, b: Run, quantity: str) -> float:
    """A's minus B's ``matched:WHAT`` (module docstring) at matched dev F1."""
    what, _, lang = quantity.removeprefix("matched:").partition(":")
    getters: dict[str, Callable[[Point], float]] = {
        "l2": lambda p: p["l2_from_pretrained"],
        "computations": lambda p: p["grad_computations"],
    }
    if what == "zero_shot":
        scored = zero_shot_langs(a, b)
        if scored is None:
            raise KeyError(f"{quantity!r}: runs without zero-shot scores along the curve")
        if lang and lang not in scored:
            raise KeyError(f"{quantity!r}: zero-shot language {lang!r}, expected one of {scored}")
        langs = [lang] if lang else scored
        metric = main_metric(a["config"]["kind"])
        getters["zero_shot"] = partial(mean_zero_shot, langs=langs, metric=metric)
    if what not in getters or (lang and what != "zero_shot"):
        raise KeyError(f"{quantity!r}: expected matched:l2, matched:computations or "
                       "matched:zero_shot[:LANG]")  # fmt: skip
    [(va, vb)] = at_matched_dev(a, b, getters[what])
    return va - vb


def run_value(run: Run, quantity: str) -> float:
    """One run's QUANTITY (module docstring); ``KeyError`` when the run does not have it."""
    metric = main_metric(run["config"]["kind"])
    curve = [p for rec in run["runs"].values() for p in rec["curve"]]
    found: float | None = None
    if quantity in SUMMARY_FIELDS:
        found = report.summarise_run(run)[quantity]
    elif m := SPLIT_AT.fullmatch(quantity):
        scores = TB.scores_by_language(run, m["at"], m["split"])
        langs = [m["lang"]] if m["lang"] else list(scores)
        name = "f1_truncated" if m["truncated"] else metric
        if langs and all(x in scores and name in scores[x] for x in langs):
            found = statistics.fmean(scores[x][name] for x in langs)
    elif quantity.startswith("cosine_from:"):
        start = int(quantity.split(":")[1])
        cosines = [
            p["task_grad_cosine"]
            for p in curve
            if p["grad_computations"] >= start and "task_grad_cosine" in p
        ]
        found = statistics.fmean(cosines) if cosines else None
    elif quantity.startswith("dev@"):
        at = int(quantity[4:])
        found = next((p["dev_mean"] for p in curve if p["grad_computations"] == at), None)
    elif (field := quantity.partition(":"))[0] in PLATEAU_FIELDS:
        name, _, lang = field
        if lang and not all(lang in p["dev"] for p in one_model_curve(run)):
            raise KeyError(f"quantity {quantity!r}: no dev language {lang!r} in {run['config']}")
        found = plateau(run, lang or None)[name]
    elif quantity == "lr":
        found = run["config"]["lr"]
    elif quantity == "wall_hours":
        seconds = [rec.get("wall_seconds") for rec in run["runs"].values()]
        found = None if None in seconds else sum(seconds) / 3600
    if found is None:
        raise KeyError(f"quantity {quantity!r}: not in run {run['config']}")
    return float(found)


def _digits(quantity: str) -> int:
    if quantity.endswith("_at") or quantity in ("matched:computations", "stays_from"):
        return 0
    if quantity.startswith(("cosine", "mean_task_grad_cosine", "seconds")):
        return 3
    return 2 if quantity.startswith(("l2", "matched:l2")) else 1


def value(key: str, results: Path, cache: Loaded | None = None) -> str:
    """The text of KEY (module docstring), from the JSON files under ``results``."""
    group, selection, quantity, *rest = key.split("/")
    statistic = rest[0] if rest else "mean"
    cache = {} if cache is None else cache
    if group not in cache:
        cache[group] = load_runs(results / group) if (results / group).is_dir() else {}
    runs = cache[group]
    signed = False
    if selection in runs:
        values = [run_value(runs[selection], quantity)]
        seeds = [runs[selection]["config"]["seed"]]
    elif "-" in selection:
        first, _, second = selection.partition("-")
        matched = paired_seeds(list(runs.values()), (first, second))
        if quantity.startswith("cosine_wins_from:") and matched:
            return cosine_wins(matched, int(quantity.split(":")[1]))
        if quantity.startswith("matched:"):  # a run that never rose has no match
            matched = [(s, a, b) for s, a, b in matched if not (never_rose(a) or never_rose(b))]
            values = [matched_value(a, b, quantity) for _, a, b in matched]
        else:
            values = [run_value(a, quantity) - run_value(b, quantity) for _, a, b in matched]
        seeds, signed = [s for s, _, _ in matched], True
    else:
        mine = sorted(by_seed(list(runs.values()), selection).items())
        values = [run_value(r, quantity) for _, r in mine]
        seeds = [s for s, _ in mine]
    if not values:
        queued = _queued(group)
        if selection in queued or set(selection.split("-")) <= queued:
            return "0" if statistic == "n" else "not run yet"
        raise KeyError(f"{key}: no runs of {selection!r} in {results / group}")
    d = _digits(quantity)

    def num(x: float) -> str:
        if quantity == "lr":
            return report.rate(x)
        return f"{x:+.{d}f}" if signed else f"{x:.{d}f}"

    mean = statistics.fmean(values)
    texts = {
        "mean": lambda: num(mean),
        "pm": lambda: (
            num(mean) + (f" ± {statistics.stdev(values):.{d}f}" if len(values) > 1 else "")
        ),
        "min": lambda: num(min(values)),
        "max": lambda: num(max(values)),
        "sum": lambda: num(sum(values)),
        "n": lambda: str(len(values)),
        "ci": lambda: seed_interval(values, d, signed),
        "seeds": lambda: ", ".join(str(s) for s in seeds),
    }
    if statistic not in texts:
        raise KeyError(f"{key}: statistic {statistic!r}, expected one of {sorted(texts)}")
    return texts[statistic]()


def cosine_wins(matched: Sequence[tuple[int, Run, Run]], start: int) -> str:
    """``"w of n"``: at w of the n evaluation points from ``start`` computations on (over
    the paired seeds) A's task-gradient cosine is above B's."""
    wins = total = 0
    for _, a, b in matched:
        if "all" not in a["runs"] or "all" not in b["runs"]:
            raise KeyError("cosine_wins_from: needs runs of one model (not STL)")
        cos_b = {
            p["grad_computations"]: p.get("task_grad_cosine") for p in b["runs"]["all"]["curve"]
        }
        for p in a["runs"]["all"]["curve"]:
            other = cos_b.get(p["grad_computations"])
            if p["grad_computations"] >= start and other is not None and "task_grad_cosine" in p:
                total += 1
                wins += p["task_grad_cosine"] > other
    if not total:
        raise KeyError(f"cosine_wins_from:{start}: no paired points with a cosine")
    return f"{wins} of {total}"


def _queued(group: str) -> set[str]:
    """The runs (file stems) and methods the campaign queues in ``group``."""
    from benchmarks.nlp import campaign

    names = {j.name for j in campaign.jobs() if j.group == group}
    return names | {name.split("_")[0] for name in names}


def fill_values(text: str, results: Path, loaded: Loaded | None = None) -> str:
    """``text`` with every ``<!-- v:KEY -->...<!-- /v -->`` holding :func:`value` of KEY
    (``loaded``: group -> :func:`load_runs` of its folder, where already read)."""
    cache: Loaded = dict(loaded or {})

    def replace(match: re.Match[str]) -> str:
        key = match["key"]
        return f"<!-- v:{key} -->{value(key, results, cache)}<!-- /v -->"

    return MARKER.sub(replace, text)
