"""Step time of each surgery method relative to MTL (T = 8, small transformer encoder), and
peak extra CPU memory of ``backward``, beside the same step with the peers' implementations:
torchjd (``mtl_backward`` + ``jac_to_grad`` with its PCGrad, GradVac, MGDA, CAGrad
aggregators), pytorch_optimizer's ``PCGrad`` and a naive flatten-and-copy PCGrad.

Run: ``python benchmarks/speed/bench_surgery.py [--rounds N] [--threads N]``. Prints and
writes ``benchmarks/results/surgery_speed.{json,md}``. Timings are medians of the thread CPU
time (``time.thread_time``) and of the wall time over rounds that interleave every contender
in one process (alternating the order). Memory is measured with the torch profiler's CPU
allocation events (every allocation and free of torch's CPU allocator, with sizes): the
peak of live bytes during the call minus the bytes live at its start, in units of the
shared parameters' size. A peer that is not installed is left out (and named in the output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from torch_seqreptile.surgery import MGDA, MTL, CAGrad, GradNorm, GradVac, PCGrad

TASKS = 8
RESULTS = Path(__file__).resolve().parents[1] / "results"


class Encoder(nn.Module):
    def __init__(self, vocab: int = 2000, dim: int = 64, layers: int = 2, tasks: int = TASKS):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(dim, 3) for _ in range(tasks))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last shared representation (what torchjd's ``mtl_backward`` needs)."""
        return self.encoder(self.embed(tokens)).mean(1)

    def forward(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(tokens))


def make(name: str, model: Encoder):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layers = [list(layer.parameters()) for layer in model.encoder.layers]
    return {
        "MTL": lambda: MTL(inner, num_tasks=TASKS),
        "PCGrad": lambda: PCGrad(inner, num_tasks=TASKS, seed=0),
        "GradVac": lambda: GradVac(inner, 0.01, layers=layers, num_tasks=TASKS, seed=0),
        "GradNorm": lambda: GradNorm(
            inner, TASKS, 1.5, layer=model.encoder.layers[-1].linear2.weight
        ),
        "CAGrad": lambda: CAGrad(inner, 0.4, num_tasks=TASKS),
        "MGDA": lambda: MGDA(inner, num_tasks=TASKS),
    }[name]()


OURS = ["MTL", "PCGrad", "GradVac", "GradNorm", "CAGrad", "MGDA"]


@dataclass
class Contender:
    """One implementation's step: ``backward(forward(model, data))``, then ``step()``."""

    forward: Callable[[Encoder, Any], Any]
    backward: Callable[[Any], None]
    step: Callable[[], Any]
    zero_grad: Callable[[], None]


def ours(name: str, model: Encoder) -> Contender:
    opt = make(name, model)
    return Contender(losses_of, opt.backward, opt.step, opt.zero_grad)


def torchjd_aggregators() -> dict[str, Callable[[], Any]]:
    """torchjd's aggregators of the methods we also implement, with our hyperparameters."""
    if importlib.util.find_spec("torchjd") is None:
        return {}
    from torchjd import aggregation

    found: dict[str, Callable[[], Any]] = {
        "torchjd PCGrad": aggregation.PCGrad,
        "torchjd GradVac": lambda: aggregation.GradVac(beta=0.01),
        "torchjd MGDA": aggregation.MGDA,
    }
    if importlib.util.find_spec("cvxpy") is not None:
        found["torchjd CAGrad"] = lambda: aggregation.CAGrad(c=0.4)
    return found


def torchjd_contender(make_aggregator: Callable[[], Any], model: Encoder) -> Contender:
    from torchjd.autojac import jac_to_grad, mtl_backward

    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aggregator = make_aggregator()
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads")]

    def forward(m: Encoder, data) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = [m.features(x) for x, _ in data]
        losses = [
            nn.functional.cross_entropy(m.heads[t](f), y)
            for t, (f, (_, y)) in enumerate(zip(features, data))
        ]
        return losses, features

    def backward(outputs: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        losses, features = outputs
        mtl_backward(losses, features=features)
        jac_to_grad(shared, aggregator)

    return Contender(forward, backward, inner.step, inner.zero_grad)


def pytorch_optimizer_contender(model: Encoder) -> Contender:
    from pytorch_optimizer import PCGrad as PeerPCGrad

    opt = PeerPCGrad(torch.optim.AdamW(model.parameters(), lr=1e-4), reduction="sum")
    return Contender(losses_of, opt.pc_backward, opt.step, opt.zero_grad)


def available() -> dict[str, Callable[[Encoder], Contender]]:
    """Every contender whose library is installed: name -> build it on a model."""
    out: dict[str, Callable[[Encoder], Contender]] = {
        name: lambda m, n=name: ours(n, m) for name in OURS
    }
    for name, aggregator in torchjd_aggregators().items():
        out[name] = lambda m, a=aggregator: torchjd_contender(a, m)
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        out["pytorch_optimizer PCGrad"] = pytorch_optimizer_contender
    return out


def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [
        (torch.randint(2000, (4, 16), generator=gen), torch.randint(3, (4,), generator=gen))
        for _ in range(TASKS)
    ]


def losses_of(model: Encoder, data) -> list[torch.Tensor]:
    return [nn.functional.cross_entropy(model(x, t), y) for t, (x, y) in enumerate(data)]


def naive_pcgrad_backward(model: Encoder, losses: list[torch.Tensor]) -> None:
    """The common flatten-and-copy implementation: flat per-task vectors, stacked, cloned."""
    params = list(model.parameters())
    flats = []
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, params, retain_graph=t < len(losses) - 1, allow_unused=True
        )
        flats.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads)
                ]
            )
        )
        del grads
    grads_matrix = torch.stack(flats)
    del flats
    projected = grads_matrix.clone()
    for i in range(len(losses)):
        for j in torch.randperm(len(losses)).tolist():
            dot = projected[i] @ grads_matrix[j]
            if j != i and dot < 0:
                projected[i] -= dot / (grads_matrix[j] @ grads_matrix[j]) * grads_matrix[j]
    combined = projected.sum(0)
    offset = 0
    for p in params:
        p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def peak_extra_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Encoder()
    shared_bytes = sum(
        p.numel() * p.element_size()
        for n, p in base.named_parameters()
        if not n.startswith("heads")
    )

    def fresh() -> Encoder:
        model = Encoder()
        model.load_state_dict(base.state_dict())
        return model

    builders = available()
    names = list(builders)
    setups = {}
    for name in names:
        model = fresh()
        setups[name] = (model, builders[name](model))
    missing = [
        peer
        for peer in ("torchjd", "cvxpy", "pytorch_optimizer")
        if importlib.util.find_spec(peer) is None
    ]

    def one_step(name: str, step: int) -> tuple[float, float]:
        model, contender = setups[name]
        data = batches(step)
        wall, cpu = time.perf_counter(), time.thread_time()
        contender.zero_grad()
        contender.backward(contender.forward(model, data))
        contender.step()
        return time.thread_time() - cpu, time.perf_counter() - wall

    for name in names:  # warm-up
        one_step(name, 0)
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    wall_times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            cpu, wall = one_step(name, r + 1)
            cpu_times[name].append(cpu)
            wall_times[name].append(wall)
    median = {name: statistics.median(v) for name, v in cpu_times.items()}
    median_wall = {name: statistics.median(v) for name, v in wall_times.items()}

    memory = {}
    for name in [*names, "naive PCGrad (flatten+copy)", "plain sum(losses).backward()"]:
        model = fresh()
        data = batches(99)
        if name.startswith("naive"):
            losses = losses_of(model, data)
            fn = lambda m=model, ls=losses: naive_pcgrad_backward(m, ls)  # noqa: E731
        elif name.startswith("plain"):
            losses = losses_of(model, data)
            fn = lambda ls=losses: torch.stack(ls).sum().backward()  # noqa: E731
        else:  # the forward pass outside, as for the two above
            contender = builders[name](model)
            outputs = contender.forward(model, data)
            fn = lambda c=contender, o=outputs: c.backward(o)  # noqa: E731
        memory[name] = peak_extra_bytes(fn) / shared_bytes

    result = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tasks": TASKS,
        "shared_params": shared_bytes // 4,
        "rounds": args.rounds,
        "peers_not_installed": missing,
        "step_cpu_seconds_median": median,
        "step_wall_seconds_median": median_wall,
        "step_time_ratio_vs_mtl": {n: median[n] / median["MTL"] for n in names},
        "peak_extra_memory_in_shared_param_sizes": memory,
    }
    lines = [
        "# Surgery methods and their peers: speed and memory (T = 8, small transformer encoder)",
        "",
        f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), "
        f"{result['shared_params']} shared parameters, median of {args.rounds} interleaved "
        "rounds in one process (thread CPU time; wall time beside it).",
        *([f"Not installed, left out: {', '.join(missing)}."] if missing else []),
        "",
        "| method | step CPU time (ms) | wall (ms) | ratio vs MTL |",
        "|---|---|---|---|",
        *[
            f"| {n} | {1e3 * median[n]:.1f} | {1e3 * median_wall[n]:.1f} | "
            f"{median[n] / median['MTL']:.2f} |"
            for n in names
        ],
        "",
        "| backward of | peak extra memory (× shared parameters) |",
        "|---|---|",
        *[f"| {n} | {v:.2f} |" for n, v in memory.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "surgery_speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "surgery_speed.md").write_text(text)


if __name__ == "__main__":
    main()
