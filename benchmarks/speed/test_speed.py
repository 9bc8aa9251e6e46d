"""pytest-benchmark suite of the core's hot paths.

Smoke mode (the default of the test suite, ``--benchmark-disable``) runs each once at tiny
sizes. Timed run at full sizes::

    SEQREPTILE_BENCH_FULL=1 python -m pytest benchmarks/speed -p no:randomly --benchmark-enable

Ratios side by side in one process are in ``bench_core.py`` (the report script).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from benchmarks.speed.bench_core import TinyEncoder, mbert_shapes
from torch_seqreptile import SeqReptile
from torch_seqreptile._interpolate import OUTER_IMPLS, outer_update_

FULL = os.environ.get("SEQREPTILE_BENCH_FULL") == "1"
Benchmark = Callable[..., object]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def mlp_with_grads() -> nn.Module:
    width = 512 if FULL else 32
    mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
    for p in mlp.parameters():
        p.grad = torch.randn_like(p)
    return mlp


@pytest.mark.parametrize("wrapped", [False, True], ids=["fused_adamw", "seqreptile_non_outer"])
def test_optimizer_step(benchmark: Benchmark, wrapped: bool) -> None:
    mlp = mlp_with_grads()
    opt: torch.optim.Optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True)
    if wrapped:
        opt = SeqReptile(opt, 10**9, 0.1)
    benchmark(opt.step)
    assert all(len(s) > 0 for s in opt.state.values())


@pytest.mark.parametrize("impl", OUTER_IMPLS)
def test_outer_update(benchmark: Benchmark, impl: str) -> None:
    shapes = mbert_shapes() if FULL else mbert_shapes(vocab=100, layers=1)
    fast = [torch.randn(s) for s in shapes]
    slow = [f + 1.0 for f in fast]
    expected = [s.lerp(f, 0.25) for s, f in zip(slow, fast)]
    outer_update_(slow, fast, fast, [], outer_lr=0.25, impl=impl)
    torch.testing.assert_close(slow, expected)
    torch.testing.assert_close(fast, expected)
    benchmark(outer_update_, slow, fast, fast, [], outer_lr=0.25, impl=impl)


@pytest.mark.parametrize("method", ["mtl", "seqreptile"])
def test_training_step(benchmark: Benchmark, method: str) -> None:
    """One step on 32 examples: one task (SeqReptile, K=20) or 4 tasks x 8 (MTL)."""
    torch.manual_seed(0)
    model = TinyEncoder(layers=4 if FULL else 1)
    tokens = torch.randint(5000, (32, 64 if FULL else 8))
    labels = torch.randint(3, (32,))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    opt = SeqReptile(inner, 20, 0.1) if method == "seqreptile" else inner

    def step() -> None:
        opt.zero_grad()
        logits = model(tokens)
        if method == "mtl":
            losses = [
                nn.functional.cross_entropy(logits[8 * t : 8 * t + 8], labels[8 * t : 8 * t + 8])
                for t in range(4)
            ]
            torch.stack(losses).mean().backward()
        else:
            nn.functional.cross_entropy(logits, labels).backward()
        opt.step()

    benchmark(step)
