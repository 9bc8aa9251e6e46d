"""Paper-style tables from the runner's JSON files, with the paper's numbers beside ours.

    python -m benchmarks.nlp.tables [--results benchmarks/results/nlp] [--at best_dev|end]

Each cell reads ``ours (paper)``; ours is the mean ± std over the seeds found. Tables 1-2
use the test sets of the training languages (TyDi: its dev set, as in the paper), Tables 3-5
the zero-shot sets; MasakhaNER (not in the paper) prints one table of each. The columns are
the languages that were run (all of the paper's when none was), and Avg. is the mean over
those columns, for the paper's numbers too.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "nlp"
ROW_NAMES = {
    "stl": "STL",
    "mtl": "MTL",
    "recadam": "RecAdam",
    "gradnorm": "GradNorm",
    "pcgrad": "PCGrad",
    "gradvac": "GradVac",
    "reptile": "Reptile",
    "seqreptile": "Seq.Reptile",
    "sequential": "Sequential",
}


def _row(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def _qa_row(text: str) -> list[tuple[float, float]]:
    cells = [c.split("/") for c in text.split(",")]
    return [(float(f), float(e)) for f, e in cells]


# The paper's Tables 1-5 (Lee et al., ICLR 2022), F1/EM for QA, F1 for NER, accuracy for NLI.
PAPER: dict[str, dict[str, Any]] = {
    "tydiqa": {
        "title": "Table 1: TyDi QA Gold Passage (F1/EM)",
        "langs": ["ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"],
        "metric": "f1/em", "split": "test",
        "rows": {
            "stl": _qa_row("80.5/65.9,70.9/58.4,72.0/59.2,76.2/63.7,82.7/70.6,61.0/50.8,73.4/56.5,78.4/70.1,81.1/66.4"),
            "mtl": _qa_row("79.7/64.7,74.7/64.0,72.8/61.1,77.8/64.7,82.9/71.3,64.0/53.4,73.9/57.1,80.5/72.5,82.5/67.9"),
            "recadam": _qa_row("79.0/63.7,72.5/62.4,73.5/62.8,76.9/64.9,82.1/72.2,64.6/54.5,73.9/57.6,80.4/72.9,82.8/68.4"),
            "gradnorm": _qa_row("78.8/62.9,72.5/61.9,73.4/60.6,78.5/65.8,83.7/74.3,66.2/53.9,74.5/57.7,80.7/72.7,83.3/68.9"),
            "pcgrad": _qa_row("79.9/65.0,72.6/61.5,74.6/62.3,78.3/65.7,82.7/73.0,65.9/56.1,74.2/57.3,80.6/73.0,82.5/68.1"),
            "gradvac": _qa_row("80.1/64.7,71.5/59.2,73.0/61.2,78.6/65.5,83.1/72.4,63.8/53.4,74.1/57.6,80.6/72.6,82.2/67.5"),
            "reptile": _qa_row("79.8/65.2,75.1/64.1,74.0/62.8,78.8/65.3,83.8/73.6,65.7/55.9,75.5/58.7,81.4/72.9,83.1/68.5"),
            "seqreptile": _qa_row("81.2/66.7,73.9/62.6,76.7/65.2,79.4/66.3,84.9/74.7,68.0/58.2,76.8/59.2,82.9/74.8,83.0/68.6"),
        },
    },
    "wikiann": {
        "title": "Table 2: WikiANN NER (F1)",
        "langs": ["de", "en", "es", "hi", "jv", "kk", "mr", "my", "sw", "te", "tl", "yo"],
        "metric": "f1", "split": "test",
        "rows": {
            "stl": _row("90.3 85.0 92.0 89.7 59.1 88.5 89.4 61.7 90.7 80.1 96.3 77.7"),
            "mtl": _row("83.4 77.8 87.6 82.3 77.7 87.5 82.2 75.7 87.5 78.8 83.5 90.8"),
            "recadam": _row("84.5 80.0 88.5 82.7 85.3 88.5 84.4 70.3 89.0 81.6 87.7 91.6"),
            "gradnorm": _row("83.6 77.5 87.3 82.8 78.3 87.8 81.3 73.5 85.4 78.9 83.6 91.4"),
            "pcgrad": _row("83.8 78.5 88.1 81.7 79.7 87.8 81.7 74.4 85.9 78.4 85.7 92.3"),
            "gradvac": _row("83.9 79.5 88.3 81.8 80.6 87.5 82.2 73.9 87.9 79.4 87.9 93.0"),
            "reptile": _row("85.9 82.4 90.0 86.3 81.3 81.4 86.8 61.8 90.6 72.7 92.8 93.0"),
            "seqreptile": _row("87.4 83.9 90.8 88.1 85.2 89.4 88.9 76.0 91.5 82.5 94.7 92.5"),
        },
    },
    "tydi_mlqa": {
        "title": "Table 3: TyDi QA -> MLQA zero-shot (F1/EM)",
        "langs": ["de", "es", "hi", "vi", "zh"], "metric": "f1/em", "split": "zero_shot",
        "rows": {
            "mtl": _qa_row("50.6/35.8,54.3/35.4,45.0/31.2,53.7/34.8,52.5/32.0"),
            "recadam": _qa_row("49.5/36.1,52.8/35.6,41.7/29.0,52.2/34.6,49.8/29.9"),
            "gradnorm": _qa_row("51.7/36.6,54.9/36.3,44.4/30.4,55.3/37.1,52.9/32.2"),
            "pcgrad": _qa_row("50.6/36.5,54.5/36.2,44.1/31.2,54.4/34.8,52.4/31.5"),
            "gradvac": _qa_row("50.0/35.4,53.0/35.2,41.6/28.6,52.9/34.9,51.3/31.2"),
            "reptile": _qa_row("52.2/38.2,56.1/38.0,45.9/32.1,56.9/38.2,53.9/33.2"),
            "seqreptile": _qa_row("53.7/38.5,57.6/38.9,47.7/33.7,58.1/39.2,55.1/34.7"),
        },
    },
    "squad_mlqa": {
        "title": "Table 4: SQuAD -> MLQA zero-shot (F1/EM)",
        "langs": ["ar", "de", "es", "hi", "vi", "zh"], "metric": "f1/em", "split": "zero_shot",
        "rows": {
            "mtl": _qa_row("48.0/29.9,59.1/44.6,64.2/46.2,44.6/29.0,56.8/37.8,55.2/34.7"),
            "recadam": _qa_row("47.3/29.8,58.8/44.0,64.3/46.2,45.5/29.9,57.9/38.4,54.8/34.1"),
            "gradnorm": _qa_row("48.7/31.3,59.8/44.6,64.8/46.3,47.2/31.2,57.2/37.8,55.0/33.9"),
            "pcgrad": _qa_row("47.7/29.8,59.2/44.1,65.4/46.1,41.0/26.0,57.4/37.4,54.6/34.0"),
            "gradvac": _qa_row("45.3/28.3,58.2/43.4,63.9/45.9,42.4/27.9,56.3/37.1,53.0/32.9"),
            "reptile": _qa_row("46.8/29.9,58.7/44.4,65.1/47.5,41.5/27.9,56.1/37.7,53.9/33.9"),
            "seqreptile": _qa_row("52.8/34.3,60.7/45.9,67.1/48.7,50.6/35.6,60.7/40.8,57.3/36.5"),
        },
    },
    "mnli_xnli": {
        "title": "Table 5: MNLI -> XNLI zero-shot (accuracy)",
        "langs": ["ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"],
        "metric": "accuracy", "split": "zero_shot",
        "rows": {
            "mtl": _row("65.1 68.8 71.3 66.4 74.3 72.6 59.2 68.8 50.1 52.8 61.8 57.9 69.4 69.0"),
            "recadam": _row("63.5 66.9 69.4 65.2 72.7 72.2 58.8 67.3 49.9 51.9 61.0 56.5 67.9 67.7"),
            "gradnorm": _row("64.0 68.2 70.6 67.0 74.1 72.9 58.8 68.0 48.9 53.2 61.0 56.8 70.3 69.3"),
            "pcgrad": _row("64.0 68.7 69.8 66.5 74.3 71.8 59.4 68.3 51.0 53.1 60.7 57.4 69.7 69.3"),
            "gradvac": _row("62.3 67.8 69.2 65.9 72.6 72.2 59.6 67.1 51.1 52.9 61.7 56.4 68.8 68.0"),
            "reptile": _row("63.3 66.6 69.4 64.9 72.6 71.3 58.3 66.9 46.4 47.5 58.6 55.9 68.6 66.9"),
            "seqreptile": _row("67.2 69.3 71.9 67.8 75.1 74.1 60.6 69.5 51.2 55.1 63.8 59.1 70.8 69.6"),
        },
    },
    "masakhaner": {
        "title": "MasakhaNER (not in the paper): F1",
        "langs": [], "metric": "f1", "split": "test", "rows": {},
    },
}  # fmt: skip


def scores_by_language(run: dict[str, Any], at: str, split: str) -> dict[str, dict[str, float]]:
    """language -> metrics of one run (``at``: best_dev or end), STL runs merged."""
    out: dict[str, dict[str, float]] = {}
    for rec in run["runs"].values():
        block = rec.get(at) or rec["end"]
        out.update(block.get(split, {}))
    return out


def language_columns(task: str, ran: set[str]) -> list[str]:
    """The languages of a table: those run, in the paper's order, then the others sorted
    (all of the paper's when none was run); Avg. is over these columns, the paper's too."""
    paper = PAPER[task]["langs"]
    return [x for x in paper if x in ran or not ran] + sorted(ran - set(paper))


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f}±{statistics.stdev(values):.1f}"


def table(task: str, runs: list[dict[str, Any]], at: str, split: str | None = None) -> str:
    """One paper-style table; ``split`` overrides the table's own (``test``/``zero_shot``)."""
    spec = PAPER[task]
    split = split or spec["split"]
    by_method: dict[str, list[dict[str, dict[str, float]]]] = defaultdict(list)
    for run in runs:
        by_method[run["config"]["method"]].append(scores_by_language(run, at, split))
    ran = {lang for m in by_method.values() for s in m for lang in s}
    langs = language_columns(task, ran)
    paper_column = {lang: i for i, lang in enumerate(spec["langs"])}
    metrics = spec["metric"].split("/")
    where = {"test": "test sets", "zero_shot": "zero-shot sets"}[split]
    lines = [f"### {spec['title']}, {where}  (ours at {at} (paper); n = seeds)", ""]
    lines.append("| method | n | " + " | ".join([*langs, "Avg."]) + " |")
    lines.append("|---" * (len(langs) + 3) + "|")
    for method, name in ROW_NAMES.items():
        ours = by_method.get(method, [])
        paper = spec["rows"].get(method)
        if not ours and paper is None:
            continue
        cells = []
        for lang in [*langs, "Avg."]:
            parts = []
            for k, metric in enumerate(metrics):
                if lang == "Avg.":
                    per_seed = [
                        statistics.fmean(s[x][metric] for x in langs if x in s)
                        for s in ours
                        if any(x in s for x in langs)
                    ]
                else:
                    per_seed = [s[lang][metric] for s in ours if lang in s]
                text = _fmt(per_seed)
                columns = langs if lang == "Avg." else [lang]
                if paper is not None and columns and all(x in paper_column for x in columns):
                    refs = [paper[paper_column[x]] for x in columns]
                    ref = statistics.fmean((v[k] if isinstance(v, tuple) else v) for v in refs)
                    text += f" ({ref:.1f})"
                parts.append(text)
            cells.append(" / ".join(parts))
        lines.append(f"| {name} | {len(ours)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of runner JSONs")
    ap.add_argument("--at", default="best_dev", choices=["best_dev", "end"])
    ap.add_argument("--scale", default=None, help="only runs of this preset scale")
    ap.add_argument("--task", default=None, choices=sorted(PAPER), help="only this task's tables")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(args.results.glob("*.json")):
        run = json.loads(path.read_text())
        if "runs" not in run or (args.scale and run["config"]["scale"] != args.scale):
            continue
        runs[run["config"]["task"]].append(run)
    for task in PAPER if args.task is None else [args.task]:
        if runs.get(task) or task != "masakhaner":
            print(table(task, runs.get(task, []), args.at))
            print()
    if runs.get("masakhaner") and any(r["preset"]["zero_shot_langs"] for r in runs["masakhaner"]):
        print(table("masakhaner", runs["masakhaner"], args.at, "zero_shot"))
        print()


if __name__ == "__main__":
    main()
