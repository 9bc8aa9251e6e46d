"""Summaries and learning curves of one group of runner JSON files (e.g. a campaign group).

    python -m benchmarks.nlp.report benchmarks/results/nlp/balanced [--png curves.png]

Writes ``summary.json`` and ``summary.md`` into the folder (and the figure, by default
``curves.png``): for each method, mean ± std over its seeds of the best dev score and where
it was reached, the test and zero-shot averages at the best dev point and at the end, the
mean pairwise task-gradient cosine over training (Fig. 4), the l2 distance from the
pretrained encoder at the end (Fig. 5c), and seconds per gradient computation. The figure
plots dev score, cosine and l2 distance against gradient computations (mean and min-max
band over seeds), each task's dev score (which shows where small tasks are overfitted), and
dev score against l2 distance (forgetting at matched accuracy, one line per seed); for runs
made with ``--curve-zero-shot`` also the mean zero-shot score against gradient computations
and against dev score (transfer at matched accuracy). STL (one model per task, own budget)
is summarised but not drawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.nlp.run import main_metric
from benchmarks.nlp.tables import ROW_NAMES, scores_by_language


def label(config: dict[str, Any]) -> str:
    """Method name, with K and eta for the Reptiles (they are what the sweep varies)."""
    name = ROW_NAMES.get(config["method"], config["method"])
    if config["method"] in ("seqreptile", "reptile"):
        name += f" (K={config['inner_steps']}, η={config['outer_lr']})"
    return name


def rate(lr: float) -> str:
    """A learning rate as ``1e-4``."""
    return f"{lr:.0e}".replace("e-0", "e-")


def _mean_metric(block: dict[str, dict[str, float]], metric: str) -> float | None:
    values = [v[metric] for v in block.values() if metric in v]
    return statistics.fmean(values) if values else None


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise_run(run: dict[str, Any]) -> dict[str, Any]:
    """Per-seed figures of one JSON file (STL: its per-task models merged)."""
    metric = main_metric(run["config"]["kind"])
    recs = list(run["runs"].values())

    curve_points = [p for rec in recs for p in rec["curve"][1:]]
    cosines = [p["task_grad_cosine"] for p in curve_points if "task_grad_cosine" in p]
    best = [rec["best_dev"] for rec in recs if "best_dev" in rec]
    return {
        "best_dev": statistics.fmean(b["dev_mean"] for b in best) if best else None,
        "best_dev_at": statistics.fmean(b["grad_computations"] for b in best) if best else None,
        "test_at_best": _mean_metric(scores_by_language(run, "best_dev", "test"), metric),
        "test_at_end": _mean_metric(scores_by_language(run, "end", "test"), metric),
        "zero_shot_at_best": _mean_metric(scores_by_language(run, "best_dev", "zero_shot"), metric),
        "zero_shot_at_end": _mean_metric(scores_by_language(run, "end", "zero_shot"), metric),
        "test_per_lang_at_best": {
            k: v[metric] for k, v in scores_by_language(run, "best_dev", "test").items()
        },
        "test_per_lang_at_end": {
            k: v[metric] for k, v in scores_by_language(run, "end", "test").items()
        },
        "mean_task_grad_cosine": statistics.fmean(cosines) if cosines else None,
        "l2_end": statistics.fmean(rec["l2_from_pretrained_end"] for rec in recs),
        "seconds_per_grad_computation": statistics.fmean(
            rec["seconds_per_grad_computation"] for rec in recs
        ),
    }


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """:func:`by_label` of the runs (JSON objects) in the folder (not ``summary.json``)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return by_label(r for r in runs if "runs" in r)


def by_label(runs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> the runs of that method, ordered by seed; the methods in the paper's row
    order. Runs of one method at several learning rates (the ``lr`` group) get one label
    per rate."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[label(run["config"])].append(run)
    for name, mine in list(groups.items()):  # a learning-rate grid: one row per rate
        rates = sorted({r["config"]["lr"] for r in mine})
        if len(rates) > 1:
            del groups[name]
            for lr in rates:
                groups[f"{name}, lr {rate(lr)}"] = [r for r in mine if r["config"]["lr"] == lr]
    for mine in groups.values():
        mine.sort(key=lambda r: r["config"]["seed"])
    order = list(ROW_NAMES)  # the paper's row order
    return dict(
        sorted(groups.items(), key=lambda kv: (order.index(kv[1][0]["config"]["method"]), kv[0]))
    )


KEYS = [
    ("best_dev", "best dev F1"),
    ("best_dev_at", "at (grad. comp.)"),
    ("test_at_best", "test F1 @best dev"),
    ("test_at_end", "test F1 @end"),
    ("zero_shot_at_best", "zero-shot F1 @best dev"),
    ("zero_shot_at_end", "zero-shot F1 @end"),
    ("mean_task_grad_cosine", "mean task-grad cosine"),
    ("l2_end", "l2 from pretrained @end"),
    ("seconds_per_grad_computation", "s / grad. comp."),
]


def summarise(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, runs in groups.items():
        per_seed = [summarise_run(r) for r in runs]
        entry: dict[str, Any] = {"seeds": [r["config"]["seed"] for r in runs]}
        for key, _ in KEYS:
            entry[key] = _stats([s[key] for s in per_seed if s[key] is not None])
        langs = sorted({lang for s in per_seed for lang in s["test_per_lang_at_best"]})
        for at in ("best", "end"):
            entry[f"test_per_lang_at_{at}"] = {
                lang: _stats([s[f"test_per_lang_at_{at}"][lang] for s in per_seed])
                for lang in langs
            }
        entry["task_sizes"] = runs[0].get("task_sizes")
        entry["budget"] = runs[0]["config"]["budget"]
        out[name] = entry
    return out


def _cell(stat: dict[str, float] | None, digits: int = 1) -> str:
    if stat is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    digits = {"mean_task_grad_cosine": 3, "l2_end": 2, "seconds_per_grad_computation": 3}
    lines = [
        "| method | seeds | " + " | ".join(title for _, title in KEYS) + " |",
        "|---" * (len(KEYS) + 2) + "|",
    ]
    for name, e in summary.items():
        cells = [_cell(e[k], digits.get(k, 0 if k == "best_dev_at" else 1)) for k, _ in KEYS]
        lines.append(f"| {name} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    langs = sorted({lang for e in summary.values() for lang in e["test_per_lang_at_best"]})
    for at in ("best", "end"):
        lines += [
            "",
            f"Test F1 per language at the {'best dev point' if at == 'best' else 'end'}:",
            "",
            "| method | " + " | ".join(langs) + " |",
            "|---" * (len(langs) + 1) + "|",
        ]
        for name, e in summary.items():
            per = e[f"test_per_lang_at_{at}"]
            lines.append(f"| {name} | " + " | ".join(_cell(per.get(x)) for x in langs) + " |")
    return "\n".join(lines) + "\n"


def _band(ax: Any, runs: list[dict[str, Any]], value: Any, name: str) -> None:
    curves = [run["runs"]["all"]["curve"] for run in runs]
    length = min(len(c) for c in curves)
    xs = [curves[0][i]["grad_computations"] for i in range(length)]
    ys = [[value(c[i]) for c in curves] for i in range(length)]
    line = ax.plot(xs, [statistics.fmean(y) for y in ys], label=name)[0]
    if len(curves) > 1:
        ax.fill_between(
            xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15
        )


def mean_zero_shot(point: dict[str, Any], langs: Sequence[str], metric: str) -> float:
    """A curve point's mean zero-shot ``metric`` over ``langs``."""
    return statistics.fmean(point["zero_shot"][x][metric] for x in langs)


def figure(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> list[str]:
    """Draw the curves of the one-model runs of ``groups`` (:func:`load`) to ``path``: dev
    F1 (mean and per language), task-gradient cosine, l2 from pretrained, and dev F1
    against l2; with zero-shot scores at every point (``--curve-zero-shot``) also mean
    zero-shot F1, and it against dev F1. Returns the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {k: v for k, v in groups.items() if "all" in v[0]["runs"]}
    curves = [run["runs"]["all"]["curve"] for runs in drawn.values() for run in runs]
    langs = sorted(curves[0][0]["dev"])
    metric = main_metric(next(iter(drawn.values()))[0]["config"]["kind"])
    score = "F1" if metric == "f1" else metric  # NLI: accuracy
    specs: list[tuple[str, Any]] = [
        (f"mean dev {score} (kept weights)", lambda p: p["dev_mean"]),
        ("mean pairwise task-gradient cosine", lambda p: p.get("task_grad_cosine", float("nan"))),
        ("l2 distance from pretrained", lambda p: p["l2_from_pretrained"]),
    ]
    for lang in langs:
        specs.append((f"dev {score}: {lang}", lambda p, lang=lang: p["dev"][lang][metric]))
    # each a curve of one quantity against another: forgetting at matched accuracy
    # (Fig. 5c against dev F1) and, with zero-shot scores at every point, transfer too
    against: list[tuple[str, str, Any, Any]] = [
        (f"mean dev {score}", "l2 distance from pretrained", lambda p: p["l2_from_pretrained"],
         lambda p: p["dev_mean"]),
    ]  # fmt: skip
    if all(p.get("zero_shot") for c in curves for p in c):
        zero_shot = partial(mean_zero_shot, langs=sorted(curves[0][0]["zero_shot"]), metric=metric)
        specs.append((f"mean zero-shot {score} (unseen languages)", zero_shot))
        against.append(
            (f"mean zero-shot {score}", f"mean dev {score}", lambda p: p["dev_mean"], zero_shot)
        )
    cols = 4
    rows = -(-(len(specs) + len(against)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (ylabel, value) in zip(flat, specs):
        for name, runs in drawn.items():
            _band(ax, runs, value, f"{name} (n={len(runs)})")
        ax.set_title(ylabel, fontsize=9)
        ax.set_xlabel("gradient computations", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, (ylabel, xlabel, x_of, y_of) in zip(flat[len(specs) :], against):
        for k, runs in enumerate(drawn.values()):
            for run in runs:
                curve = run["runs"]["all"]["curve"]
                ax.plot([x_of(p) for p in curve], [y_of(p) for p in curve], ".-", color=f"C{k}",
                        alpha=0.7)  # fmt: skip
        ax.set_title(f"{ylabel} against {xlabel}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in flat[len(specs) + len(against) :]:
        ax.axis("off")
    flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [ax.get_title() for ax in flat if ax.axison]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="figure (default: folder/curves.png)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    groups = load(args.folder)
    if not groups:
        raise SystemExit(f"{args.folder}: no runner JSON files")
    summary = summarise(groups)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.folder / "summary.md").write_text(text)
    print(text)
    figure(groups, args.png or args.folder / "curves.png", args.title or args.folder.name)


if __name__ == "__main__":
    main()
