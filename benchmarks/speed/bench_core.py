"""Speed of SeqReptile's wrapper and outer update, as ratios measured side by side.

(a) step time of SeqReptile on a non-outer step over the bare fused AdamW step, on an MLP of
    about 0.5M parameters (goal <= 1.02);
(b) the outer update of each ``outer_impl`` on a multilingual-BERT-sized parameter list
    (~178M parameters in 199 tensors) over one fused AdamW step on the same list
    (goal <= 0.65 for the fastest path; memory-traffic bound 4/7 ~= 0.57).

Run: ``python -m benchmarks.speed.bench_core [--quick]``. Writes
``benchmarks/results/core_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torch_seqreptile import SeqReptile
from torch_seqreptile._interpolate import OUTER_IMPLS, outer_update_
from torch_seqreptile._wrapper import OptimizerWrapper

RESULTS = Path(__file__).resolve().parents[1] / "results"


def mbert_shapes(vocab: int = 119_547, layers: int = 12) -> list[tuple[int, ...]]:
    """Parameter shapes of bert-base-multilingual-cased: 199 tensors, ~178M parameters."""
    h, f = 768, 3072
    shapes: list[tuple[int, ...]] = [(vocab, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]
    return [*shapes, (h, h), (h,)]


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side(
    candidate: Callable[[], object], baseline: Callable[[], object], rounds: int, repeats: int
) -> dict[str, float]:
    """Median over ``rounds`` of (candidate time / baseline time), each timed back to back."""
    ratios, cand, base = [], [], []
    baseline()  # warm-up: lazy state, allocator, first-call dispatch
    candidate()
    for _ in range(rounds):
        b = seconds(baseline, repeats)
        c = seconds(candidate, repeats)
        ratios.append(c / b)
        cand.append(c)
        base.append(b)
    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "candidate_s": statistics.median(cand),
        "baseline_s": statistics.median(base),
    }


def wrapper_overhead(rounds: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512), nn.Linear(512, 10))
    for p in mlp.parameters():
        p.grad = torch.randn_like(p)
    # Both optimizers update the same tensors, so memory layout cannot favour either.
    bare = torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True)
    # inner_steps larger than any step count here: every timed step is a non-outer step.
    wrapped = SeqReptile(torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True), 10**9, 0.1)
    wrapped.step()  # slow copies are created on the first step
    result = side_by_side(wrapped.step, bare.step, rounds, repeats)
    result["parameters"] = sum(p.numel() for p in mlp.parameters())
    # Control: a pass-through Optimizer subclass pays torch's step-hook/profiler wrapper too.
    passthrough = PassThrough(torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True))
    control = side_by_side(passthrough.step, bare.step, rounds, repeats)
    result["passthrough_ratio"] = control["ratio"]
    result["passthrough_s"] = control["candidate_s"]
    return result


class PassThrough(OptimizerWrapper):
    """The thinnest wrapper: ``step`` calls the inner step and nothing else."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        return self.optimizer.step(closure)


class TinyEncoder(nn.Module):
    """A small transformer encoder with a classification head (d=256, 4 layers, 8 heads)."""

    def __init__(self, vocab: int = 5000, dim: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 8, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def train_step_ratio(rounds: int, repeats: int, inner_steps: int, quick: bool) -> dict[str, float]:
    """K SeqReptile inner steps (including its outer update) over K MTL steps.

    Equal examples per step: SeqReptile's batch holds 32 examples of one task, MTL's holds
    8 examples of each of 4 tasks; both run forward, backward and a fused AdamW step.
    """
    torch.manual_seed(0)
    layers, length = (1, 16) if quick else (4, 64)
    tokens = torch.randint(5000, (32, length))
    labels = torch.randint(3, (32,))
    models = [TinyEncoder(layers=layers) for _ in range(2)]
    seq = SeqReptile(
        torch.optim.AdamW(models[0].parameters(), lr=1e-4, fused=True), inner_steps, 0.1
    )
    mtl = torch.optim.AdamW(models[1].parameters(), lr=1e-4, fused=True)

    def trajectory() -> None:
        for _ in range(inner_steps):
            seq.zero_grad()
            nn.functional.cross_entropy(models[0](tokens), labels).backward()
            seq.step()

    def mtl_steps() -> None:
        for _ in range(inner_steps):
            mtl.zero_grad()
            logits = models[1](tokens)
            per_task = [
                nn.functional.cross_entropy(
                    logits[t * 8 : (t + 1) * 8], labels[t * 8 : (t + 1) * 8]
                )
                for t in range(4)
            ]
            torch.stack(per_task).mean().backward()
            mtl.step()

    result = side_by_side(trajectory, mtl_steps, rounds, repeats)
    result["inner_steps"] = inner_steps
    result["parameters"] = sum(p.numel() for p in models[0].parameters())
    return result


def outer_update_ratios(
    rounds: int, repeats: int, shapes: list[tuple[int, ...]]
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    slow = [p.clone() for p in params]
    adamw = torch.optim.AdamW(params, lr=1e-5, fused=True)
    adamw.step()
    results: dict[str, dict[str, float]] = {}
    numel = sum(p.numel() for p in params)
    copy_result = side_by_side(
        lambda: torch._foreach_copy_(params, slow), adamw.step, rounds, repeats
    )
    copy_result["gb_per_s"] = 2 * 4 * numel / copy_result["candidate_s"] / 1e9
    results["copy (reference: 2 tensors of traffic)"] = copy_result
    for impl in OUTER_IMPLS:

        def update(impl: str = impl) -> None:
            outer_update_(slow, params, params, [], outer_lr=0.1, impl=impl)

        start = time.perf_counter()
        update()  # warm-up; compiles the "compiled" path
        first_call = time.perf_counter() - start
        result = side_by_side(update, adamw.step, rounds, repeats)
        result["first_call_s"] = first_call
        result["gb_per_s"] = 4 * 4 * numel / result["candidate_s"] / 1e9  # read 2, write 2
        result["ratio_to_copy"] = result["candidate_s"] / copy_result["candidate_s"]
        results[impl] = result
    results["_meta"] = {"parameters": numel, "tensors": len(params)}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, repeats = (1, 2) if args.quick else (15, 100)
    shapes = mbert_shapes(vocab=1000, layers=1) if args.quick else mbert_shapes()
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "wrapper_overhead": wrapper_overhead(rounds, repeats),
        "outer_update": outer_update_ratios(rounds, 1 if args.quick else 5, shapes),
        "train_step": train_step_ratio(rounds, 1, 2 if args.quick else 20, args.quick),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "core_speed_quick" if args.quick else "core_speed"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Machine: {report['machine']}",
        "",
        "| measurement | ratio (median) | min-max | candidate | baseline |",
        "|---|---|---|---|---|",
    ]
    w = report["wrapper_overhead"]
    lines.append(
        f"| SeqReptile non-outer step / fused AdamW step ({w['parameters'] / 1e6:.2f}M params) "
        f"| {w['ratio']:.3f} | {w['ratio_min']:.3f}-{w['ratio_max']:.3f} "
        f"| {w['candidate_s'] * 1e6:.0f} us | {w['baseline_s'] * 1e6:.0f} us |"
    )
    lines.append(
        f"| control: pass-through Optimizer subclass / fused AdamW step | "
        f"{w['passthrough_ratio']:.3f} | | {w['passthrough_s'] * 1e6:.0f} us | |"
    )
    meta = report["outer_update"].pop("_meta")
    for impl, r in report["outer_update"].items():
        lines.append(
            f"| {impl} / fused AdamW step ({meta['parameters'] / 1e6:.1f}M params, "
            f"{meta['tensors']} tensors) | {r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} "
            f"| {r['candidate_s'] * 1e3:.1f} ms ({r['gb_per_s']:.1f} GB/s) | {r['baseline_s'] * 1e3:.1f} ms |"
        )
    t = report["train_step"]
    lines.append(
        f"| {t['inner_steps']} SeqReptile steps incl. one outer update / {t['inner_steps']} MTL "
        f"steps, 32 examples per step, transformer encoder ({t['parameters'] / 1e6:.1f}M params) "
        f"| {t['ratio']:.3f} | {t['ratio_min']:.3f}-{t['ratio_max']:.3f} "
        f"| {t['candidate_s'] * 1e3:.0f} ms | {t['baseline_s'] * 1e3:.0f} ms |"
    )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
