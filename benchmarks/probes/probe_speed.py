"""Time and peak memory of TaskGradientProbe, exact vs sketch mode, on a synthetic model.

Model: an MLP built here with a fixed seed (512 -> 2048 -> 2048 -> 512, GELU; 6.3M
parameters, all probed). Task t's loss is the mean squared error on its own random batch of
``--batch-size`` examples, passed as a callable (one forward and backward pass per task and
block). One intra-op thread.

Time: in one process, each round runs the T backward passes alone (``autograd.grad`` of
every task: the work that every mode needs), the exact probe (one block) and the sketch
probe (default m), in an order that rotates from round to round; the figures are medians
over the rounds of the thread CPU time (``time.thread_time``, so other processes on the
machine do not count), after one untimed warm-up of each. Peak memory: each of the three in
a fresh process, the resident-set peak above the built model and batches
(``/proc/self/clear_refs`` + ``VmHWM``; Linux only, ``--no-memory`` skips it).

    python benchmarks/probes/probe_speed.py           # benchmarks/results/probe_speed.{json,md}
    python benchmarks/probes/probe_speed.py --quick   # smoke run: probe_speed_quick.{json,md}
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_seqreptile.probes import TaskGradientProbe

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
WIDTHS = (512, 2048, 2048, 512)
KINDS = ("backward passes only", "exact", "sketch")


def build(num_tasks: int, batch_size: int) -> tuple[nn.Module, list[Callable[[], Tensor]]]:
    """The seeded MLP and one loss callable per task (its own random batch)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(a, b), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    batches = [
        (torch.randn(batch_size, WIDTHS[0]), torch.randn(batch_size, WIDTHS[-1]))
        for _ in range(num_tasks)
    ]

    def loss(x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        return lambda: (model(x) - y).pow(2).mean()

    return model, [loss(x, y) for x, y in batches]


def runner(kind: str, model: nn.Module, losses: list[Callable[[], Tensor]]) -> Callable[[], None]:
    params = list(model.parameters())
    if kind == "backward passes only":

        def backward_only() -> None:
            for loss in losses:
                torch.autograd.grad(loss(), params)

        return backward_only
    probe = TaskGradientProbe(model, mode=kind, max_memory_bytes=None)

    def run_probe() -> None:
        probe(losses)

    return run_probe


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(kind: str, num_tasks: int, batch_size: int) -> None:
    """In this fresh process: one run of ``kind``; print its peak RSS above the baseline."""
    torch.set_num_threads(1)
    run = runner(kind, *build(num_tasks, batch_size))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := current RSS
        handle.write("5")
    base = _status_kib("VmRSS")
    run()
    print(json.dumps({"peak_above_baseline_mib": (_status_kib("VmHWM") - base) / 1024}))


def peak_memory(kind: str, num_tasks: int, batch_size: int) -> float:
    command = [sys.executable, __file__, "--child", kind, "--tasks", str(num_tasks)]
    command += ["--batch-size", str(batch_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_above_baseline_mib"])


def measure(num_tasks: int, batch_size: int, rounds: int, memory: bool) -> dict[str, Any]:
    model, losses = build(num_tasks, batch_size)
    runs = {kind: runner(kind, model, losses) for kind in KINDS}
    for run in runs.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        for i in range(len(KINDS)):
            kind = KINDS[(r + i) % len(KINDS)]
            start = time.thread_time()
            runs[kind]()
            seconds[kind].append(time.thread_time() - start)
    median = {kind: statistics.median(values) for kind, values in seconds.items()}
    backward = median["backward passes only"]
    per_round = [s / e for s, e in zip(seconds["sketch"], seconds["exact"])]
    out: dict[str, Any] = {
        "tasks": num_tasks,
        "median_seconds": median,
        "sketch_over_exact": median["sketch"] / median["exact"],
        "sketch_over_exact_per_round_min_max": [min(per_round), max(per_round)],
        "probe_seconds_above_backward": {
            mode: median[mode] - backward for mode in ("exact", "sketch")
        },
        "seconds": seconds,
    }
    if memory:
        out["peak_above_baseline_mib"] = {
            kind: peak_memory(kind, num_tasks, batch_size) for kind in KINDS
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# TaskGradientProbe: exact vs sketch time (and peak memory) on a synthetic model",
        "",
        f"{result['model']}; {result['probed_numel']:,} probed numbers; batch "
        f"{result['batch_size']} per task; sketch m = {result['sketch_dim']}; "
        f"{result['rounds']} interleaved rounds, medians of thread CPU time; "
        f"{result['machine']['threads']} thread, {result['machine']['processor']}, torch "
        f"{result['machine']['torch']}.",
        "",
        "| T | backward passes only (s) | exact (s) | sketch (s) | sketch / exact (min-max per "
        "round) | exact above backward (s) | sketch above backward (s) | peak MiB: backward "
        "/ exact / sketch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["runs"]:
        med, above = row["median_seconds"], row["probe_seconds_above_backward"]
        peak = row.get("peak_above_baseline_mib")
        peaks = " / ".join(f"{peak[k]:.0f}" for k in KINDS) if peak else "not measured"
        low, high = row["sketch_over_exact_per_round_min_max"]
        lines.append(
            f"| {row['tasks']} | {med['backward passes only']:.3f} | {med['exact']:.3f} | "
            f"{med['sketch']:.3f} | {row['sketch_over_exact']:.2f} ({low:.2f}-{high:.2f}) | "
            f"{above['exact']:.3f} | {above['sketch']:.3f} | {peaks} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=KINDS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, args.tasks[0], args.batch_size)
        return
    if args.quick:
        args.tasks, args.rounds = [4], 2
    torch.set_num_threads(1)
    model, _ = build(2, args.batch_size)
    result = {
        "model": f"MLP {' -> '.join(map(str, WIDTHS))}, GELU (seeded), MSE on random batches",
        "probed_numel": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "sketch_dim": TaskGradientProbe(model, mode="sketch").sketch_dim,
        "rounds": args.rounds,
        "runs": [measure(t, args.batch_size, args.rounds, not args.no_memory) for t in args.tasks],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"probe_speed{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"probe_speed{suffix}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
