"""Device check of every outer-update path of SeqReptile and Reptile, and of its bandwidth.

Usage::

    python -m benchmarks.gpu_check [--device cuda] [--quick] [--impls foreach per_tensor]
                                   [--out report.json]

The device defaults to ``cuda`` when available, else ``cpu``; on CPU every check runs the
same way (with the quick bandwidth size), so that the script cannot rot without a GPU:
a few seconds, plus 20-40 s for the ``compiled`` rows on a cold inductor cache (leave them
out with ``--impls foreach per_tensor``). The exit status is 1 if any check fails.

1. **Correctness.** Every outer-update path -- ``SeqReptile`` and ``Reptile``; ``outer_impl``
   ``foreach``, ``compiled`` and ``per_tensor``; plain, heavy-ball and Nesterov outer
   momentum; float32 parameters with phi on the device or on the host
   (``slow_device="cpu"``); bfloat16 and float16 parameters with their default float32
   master weights (tensors of mixed dtype or device take the per-tensor kernel whatever
   ``outer_impl`` says: those rows check that fallback); and, without momentum, bf16/fp16
   parameters with ``slow_dtype`` of their own dtype (the only way half-precision tensors
   reach the foreach and compiled kernels) -- runs three outer updates on a small model,
   with a plain SGD inner optimizer and hand-set gradients. After every outer update theta
   (the parameters), phi (``state[p]["slow_weight"]``) and the outer momentum buffers are
   compared with a float64 CPU reference of Algorithm 1 (SeqReptile) and Eq. 2-3 (Reptile),
   written out below, which rounds where the library stores: theta in the parameter dtype,
   phi and the buffers in phi's. All values are small dyadic rationals, so every operation
   of every path is exact in float32 on any hardware (one rounding per stored value when
   phi is half precision): the errors are 0 unless a path is wrong.
   Error = max |got - want| / max |want| over the quantity's tensors and outer updates.
   Tolerance: 1e-6 (float32 rounding) for float32 theta, phi and buffers; 0 for bf16/fp16
   theta, which must equal the rounding of the reference phi, and for bf16/fp16 phi.
   Two more rows: bf16 parameters with float32 master weights keep an outer update smaller
   than half a bf16 ulp (phi moves, theta's rounding stays, and theta moves once the
   updates add up), while ``slow_dtype=torch.bfloat16`` loses it (phi stays).
   A path that raises is a FAIL row that shows the error.
2. **Bandwidth.** The outer update ``outer_update_`` (SeqReptile's form, target = theta, no
   momentum) of the ``foreach`` and ``compiled`` paths on a bert-base-multilingual-sized
   float32 tensor list (~178M parameters in 199 tensors; about 14M with ``--quick`` or on
   CPU), as a fraction of ``torch._foreach_copy_``'s bandwidth over the same list. Bytes
   moved: the update reads phi and theta and writes phi and theta (4 tensors' worth), the
   copy reads one list and writes the other (2); fraction = (4 / t_update) / (2 / t_copy),
   the median over rounds that time copy and update back to back (CUDA events on CUDA,
   perf_counter on CPU). 1.0: the update moves its bytes at copy speed, as one fused pass
   can; the foreach path (lerp, then copy: 5 tensors of real traffic) gets about 0.8 where
   memory bandwidth is the limit. CPU numbers are informational only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.speed.bench_core import mbert_shapes
from torch_seqreptile import Reptile, SeqReptile
from torch_seqreptile._interpolate import OUTER_IMPLS, outer_update_
from torch_seqreptile._meta import SlowWeightsOptimizer

SHAPES: list[tuple[int, ...]] = [(8, 4), (4,), (2, 3, 2), ()]
MOMENTA: dict[str, tuple[float, bool]] = {
    "plain": (0.0, False),
    "momentum": (0.75, False),
    "nesterov": (0.75, True),
}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HALF = (torch.bfloat16, torch.float16)
#: (parameter dtype, phi on the host, slow_dtype) of every correctness case
PLACEMENTS: list[tuple[torch.dtype, bool, torch.dtype | None]] = [
    (torch.float32, False, None),
    (torch.float32, True, None),
    (torch.bfloat16, False, None),
    (torch.float16, False, None),
    (torch.bfloat16, False, torch.bfloat16),  # no momentum: see half_phi_problem
    (torch.float16, False, torch.float16),
]
FP32_TOL = 1e-6


@dataclass(frozen=True)
class Problem:
    """Initial parameters and the gradient of every inner step (float64, dyadic)."""

    init: list[Tensor]
    grads: list[list[Tensor]]
    inner_lr: float = 0.125
    outer_lr: float = 0.375
    inner_steps: int = 2
    num_tasks: int = 2  # Reptile only
    outer_updates: int = 3


@dataclass(frozen=True)
class Case:
    method: str  # "SeqReptile" or "Reptile"
    impl: str
    momentum: str  # a key of MOMENTA
    dtype: torch.dtype
    slow_on_host: bool = False
    slow_dtype: torch.dtype | None = None  # None: the library's default

    @property
    def path(self) -> str:
        host = "/slow=cpu" if self.slow_on_host else ""
        half = f"/slow_dtype={SHORT[self.slow_dtype]}" if self.slow_dtype in HALF else ""
        return f"{self.method}/{self.impl}/{self.momentum}{host}{half}"

    @property
    def phi_dtype(self) -> torch.dtype:
        if self.slow_dtype is not None:
            return self.slow_dtype
        return torch.float32 if self.dtype in HALF else self.dtype


@dataclass
class Snapshot:
    theta: list[Tensor]
    phi: list[Tensor]
    buffers: list[Tensor]


@dataclass
class Row:
    path: str
    dtype: str  # "parameter dtype/phi dtype"
    device: str
    slow_device: str
    theta_err: float
    phi_err: float  # phi and the outer momentum buffers
    theta_tol: float
    phi_tol: float
    ok: bool
    note: str = ""


@dataclass
class BandwidthRow:
    path: str
    device: str
    parameters: int
    tensors: int
    seconds: float
    gb_per_s: float
    fraction_of_copy: float
    bytes_moved: str


def make_problem(seed: int = 0) -> Problem:
    """Values k * 2^-4 in [-1, 1], gradients k * 2^-3 in [-0.5, 0.5]: exact in bf16/fp16."""
    gen = torch.Generator().manual_seed(seed)

    def dyadic(shape: tuple[int, ...], bound: int, exponent: int) -> Tensor:
        ints = torch.randint(-bound, bound + 1, shape, generator=gen)
        return ints.to(torch.float64) * 2.0**exponent

    base = Problem(init=[dyadic(s, 16, -4) for s in SHAPES], grads=[])
    steps = base.outer_updates * base.inner_steps * base.num_tasks  # enough for Reptile
    return replace(base, grads=[[dyadic(s, 4, -3) for s in SHAPES] for _ in range(steps)])


def half_phi_problem(seed: int = 0) -> Problem:
    """For phi in bf16/fp16 (``slow_dtype``): an outer_lr that neither dtype represents.

    eta = 1/4 + 2^-10 + 2^-13 has 12 significant bits, exact in float32 (where every path
    computes); a path that rounded it to phi's dtype would be off by 0.34% (bf16) or 0.05%
    (fp16). For these values each stored phi is the rounding of the exact lerp, as in the
    reference, whether float32 evaluates it with a fused multiply-add or without (checked
    when this was written). Larger inner steps make phi - theta_K large enough for a wrong
    eta to flip roundings. Without momentum only: with it the paths round intermediates
    differently (the compiled kernel keeps them in float32), so no one reference is exact.
    """
    return replace(make_problem(seed), inner_lr=1.0, outer_lr=0.25 + 2.0**-10 + 2.0**-13)


# ---------------------------------------------------------------------- float64 reference
def reference(case: Case, problem: Problem) -> list[Snapshot]:
    """Algorithm 1 (SeqReptile) / Eq. 2-3 (Reptile) in float64, one snapshot per outer update.

    Values are rounded only where the library stores them: theta in the parameter dtype
    (after every inner step and after the outer update), phi and the buffers in phi's dtype.
    """
    momentum, nesterov = MOMENTA[case.momentum]

    def as_param(x: Tensor) -> Tensor:
        return x.to(case.dtype).to(torch.float64)

    def as_slow(x: Tensor) -> Tensor:
        return x.to(case.phi_dtype).to(torch.float64)

    grads = iter(problem.grads)

    def trajectory(start: list[Tensor]) -> list[Tensor]:
        theta = start
        for _ in range(problem.inner_steps):  # theta <- theta - lr * grad (SGD)
            theta = [as_param(t - problem.inner_lr * g) for t, g in zip(theta, next(grads))]
        return theta

    theta = [as_param(x) for x in problem.init]
    phi = [as_slow(t) for t in theta]
    buffers = [torch.zeros_like(p) for p in phi]
    snapshots = []
    for _ in range(problem.outer_updates):
        if case.method == "SeqReptile":  # Alg. 1: one trajectory over the task sequence
            theta = trajectory(theta)
            target = theta
        else:  # Eq. 2: one trajectory per task, each from phi; Eq. 3: their mean end point
            total = [torch.zeros_like(p) for p in phi]
            for _ in range(problem.num_tasks):
                end = trajectory([as_param(p) for p in phi])
                total = [as_slow(s + e) for s, e in zip(total, end)]
            target = [as_slow(s / problem.num_tasks) for s in total]
        meta_grad = [p - t for p, t in zip(phi, target)]  # MG(phi) = phi - theta_K
        direction = meta_grad
        if momentum > 0.0:
            buffers = [as_slow(momentum * b + g) for b, g in zip(buffers, meta_grad)]
            direction = buffers
            if nesterov:
                direction = [g + momentum * b for g, b in zip(meta_grad, buffers)]
        phi = [as_slow(p - problem.outer_lr * d) for p, d in zip(phi, direction)]
        theta = [as_param(p) for p in phi]  # theta <- phi
        snapshots.append(Snapshot(theta, phi, buffers if momentum > 0.0 else []))
    return snapshots


# ---------------------------------------------------------------------- the library
def run_library(case: Case, problem: Problem, device: torch.device) -> list[Snapshot]:
    """The same run with the library; checks where and in which dtype phi lives."""
    momentum, nesterov = MOMENTA[case.momentum]
    params = [torch.nn.Parameter(x.to(device=device, dtype=case.dtype)) for x in problem.init]
    inner = torch.optim.SGD(params, lr=problem.inner_lr)
    options: dict[str, Any] = {
        "outer_momentum": momentum,
        "nesterov": nesterov,
        "slow_device": "cpu" if case.slow_on_host else None,
        "slow_dtype": case.slow_dtype,
        "outer_impl": case.impl,
    }
    opt: SlowWeightsOptimizer
    if case.method == "SeqReptile":
        opt = SeqReptile(inner, problem.inner_steps, problem.outer_lr, **options)
        steps_per_update = problem.inner_steps
    else:
        opt = Reptile(inner, problem.inner_steps, problem.outer_lr, problem.num_tasks, **options)
        steps_per_update = problem.inner_steps * problem.num_tasks
    grads = iter(problem.grads)
    snapshots = []
    for _ in range(problem.outer_updates):
        for _ in range(steps_per_update):
            for p, g in zip(params, next(grads)):
                p.grad = g.to(device=device, dtype=case.dtype)
            opt.step()
        if opt.trajectory_step != 0:
            raise AssertionError("no outer update after the round's last inner step")
        phi = [opt.state[p]["slow_weight"] for p in params]
        want_device = torch.device("cpu") if case.slow_on_host else params[0].device
        for s in phi:
            if s.device != want_device or s.dtype != case.phi_dtype:
                raise AssertionError(
                    f"phi is {s.dtype} on {s.device}, expected {case.phi_dtype} on {want_device}"
                )
        buffers = [opt.state[p]["outer_momentum_buffer"] for p in params] if momentum else []
        snapshots.append(Snapshot(*([_host(t) for t in ts] for ts in (params, phi, buffers))))
    return snapshots


def _host(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def relative_error(got: list[list[Tensor]], want: list[list[Tensor]]) -> float:
    """max |got - want| / max |want| over all tensors (of all snapshots); NaN stays NaN."""
    g = torch.cat([t.flatten() for ts in got for t in ts] + [torch.zeros(1, dtype=torch.float64)])
    w = torch.cat([t.flatten() for ts in want for t in ts] + [torch.zeros(1, dtype=torch.float64)])
    return float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30)


def check(
    case: Case,
    problem: Problem,
    device: torch.device,
    extra: Callable[[list[Snapshot]], str] | None = None,
    name: str | None = None,
) -> Row:
    """One row: the library's run against the reference (``extra`` may add a failure)."""
    theta_tol = 0.0 if case.dtype in HALF else FP32_TOL
    phi_tol = 0.0 if case.phi_dtype in HALF else FP32_TOL
    note = ""
    try:
        got = run_library(case, problem, device)
        want = reference(case, problem)
        theta_err = relative_error([s.theta for s in got], [s.theta for s in want])
        phi_err = max(
            relative_error([s.phi for s in got], [s.phi for s in want]),
            relative_error([s.buffers for s in got], [s.buffers for s in want]),
        )
        note = extra(got) if extra is not None else ""
    except Exception as error:  # a crashing path is a failing path
        theta_err = phi_err = math.nan
        note = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    ok = theta_err <= theta_tol and phi_err <= phi_tol and not note
    return Row(
        path=name or case.path,
        dtype=f"{SHORT[case.dtype]}/{SHORT[case.phi_dtype]}",
        device=str(device),
        slow_device="cpu" if case.slow_on_host else str(device),
        theta_err=theta_err,
        phi_err=phi_err,
        theta_tol=theta_tol,
        phi_tol=phi_tol,
        ok=ok,
        note=note,
    )


def cases(impls: Sequence[str]) -> list[Case]:
    """Every correctness case: method x impl x momentum x (dtype, phi placement)."""
    return [
        Case(method, impl, momentum, dtype, host, slow_dtype)
        for method in ("SeqReptile", "Reptile")
        for impl in impls
        for momentum in MOMENTA
        for dtype, host, slow_dtype in PLACEMENTS
        if slow_dtype not in HALF or momentum == "plain"
    ]


def sub_ulp_rows(device: torch.device) -> list[Row]:
    """An outer update of a quarter bf16 ulp: kept by float32 phi, lost by bf16 phi.

    theta = phi = 1 (bf16 ulp 2^-7); one inner step moves theta up one ulp; the outer
    update (eta = 1/4) moves phi by 2^-9, under half an ulp, so theta rounds back to 1. With
    float32 phi the updates add up and theta rounds up at the third; with bf16 phi each is lost.
    """
    ones = [torch.ones(8, dtype=torch.float64)]
    problem = Problem(
        init=ones,
        grads=[[-0.0625 * ones[0]]] * 3,  # lr * grad = -2^-7: one ulp up
        outer_lr=0.25,
        inner_steps=1,
        outer_updates=3,
    )
    ulp = 2.0**-7

    def kept(got: list[Snapshot]) -> str:
        first, last = got[0], got[-1]
        if not (torch.all(first.theta[0] == 1.0) and torch.all(first.phi[0] == 1 + ulp / 4)):
            return "first update: theta must stay 1 and phi move by a quarter ulp"
        return "" if torch.all(last.theta[0] == 1 + ulp) else "theta never moved"

    def lost(got: list[Snapshot]) -> str:
        return "" if all(torch.all(s.phi[0] == 1.0) for s in got) else "bf16 phi moved"

    seq = "SeqReptile/foreach/plain"
    return [
        check(Case("SeqReptile", "foreach", "plain", torch.bfloat16), problem, device, kept,
              f"{seq}/sub-half-ulp kept"),
        check(Case("SeqReptile", "foreach", "plain", torch.bfloat16, slow_dtype=torch.bfloat16),
              problem, device, lost, f"{seq}/sub-half-ulp lost (slow_dtype=bf16)"),
    ]  # fmt: skip


# ---------------------------------------------------------------------- bandwidth
def round_seconds(
    fns: Sequence[Callable[[], object]], device: torch.device, rounds: int
) -> list[list[float]]:
    """Seconds of each call of each ``fn``, called in turn, round after round.

    Interleaving keeps a noisy (shared) machine from favouring one of them; CUDA events
    time the device work only.
    """
    for fn in fns:  # warm-up: lazy allocation; the compiled path compiles here
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(rounds):
            for fn in fns:
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                fn()
                end.record()
                events.append((start, end))
        torch.cuda.synchronize(device)
        for i, (start, end) in enumerate(events):
            times[i % len(fns)].append(start.elapsed_time(end) / 1e3)
        return times
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            begin = time.perf_counter()
            fn()
            out.append(time.perf_counter() - begin)
    return times


def bandwidth(
    device: torch.device, shapes: list[tuple[int, ...]], impls: Sequence[str], rounds: int
) -> list[BandwidthRow]:
    """Bandwidth of the outer update (4 tensors moved) over ``_foreach_copy_``'s (2 moved)."""
    slow = [torch.rand(s, device=device) for s in shapes]
    fast = [s.clone() for s in slow]
    numel = sum(s.numel() for s in slow)
    tensor_bytes = 4 * numel  # float32
    paths = [i for i in ("foreach", "compiled") if i in impls]

    def update(impl: str) -> Callable[[], None]:
        return lambda: outer_update_(slow, fast, fast, [], outer_lr=0.375, impl=impl)

    def copy() -> None:
        torch._foreach_copy_(fast, slow)

    times = round_seconds([copy, *(update(impl) for impl in paths)], device, rounds)
    rows = []
    for name, moved, ts in zip(["_foreach_copy_", *paths], [2] + [4] * len(paths), times):
        # per round: (moved / t) / (2 / t_copy); the median of those ratios
        fraction = statistics.median(moved * c / (2 * t) for t, c in zip(ts, times[0]))
        seconds = statistics.median(ts)
        rows.append(
            BandwidthRow(
                path=f"bandwidth/{name}",
                device=str(device),
                parameters=numel,
                tensors=len(shapes),
                seconds=seconds,
                gb_per_s=moved * tensor_bytes / seconds / 1e9,
                fraction_of_copy=fraction,
                bytes_moved="read 1 + write 1" if moved == 2 else "read 2 + write 2",
            )
        )
    return rows


# ---------------------------------------------------------------------- report
def _num(x: float) -> str:
    return f"{x:.0e}" if x else "0"


def print_table(rows: list[Row], bw_rows: list[BandwidthRow]) -> None:
    width = max(len(r.path) for r in rows)
    print(
        f"{'path':<{width}}  {'dtype':<9}  {'device':<6}  {'slow':<6}  {'theta err':>9}  "
        f"{'phi err':>9}  {'tol theta/phi':>13}  result"
    )
    for r in rows:
        tol = f"{_num(r.theta_tol)}/{_num(r.phi_tol)}"
        print(
            f"{r.path:<{width}}  {r.dtype:<9}  {r.device:<6}  {r.slow_device:<6}  "
            f"{_num(r.theta_err):>9}  {_num(r.phi_err):>9}  {tol:>13}  "
            f"{'OK' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}"
        )
    if bw_rows:
        first = bw_rows[0]
        print(
            f"\nouter update bandwidth, {first.parameters / 1e6:.1f}M float32 parameters in "
            f"{first.tensors} tensors on {first.device} (median time; bytes: copy moves 2 "
            "tensors, the update 4)"
        )
        print(f"{'path':<{width}}  {'ms':>9}  {'GB/s':>9}  {'of copy':>9}  bytes moved")
        for b in bw_rows:
            print(
                f"{b.path:<{width}}  {b.seconds * 1e3:>9.3f}  {b.gb_per_s:>9.1f}  "
                f"{b.fraction_of_copy:>9.2f}  {b.bytes_moved}"
            )


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="default: cuda if available")
    parser.add_argument(
        "--quick", action="store_true", help="small bandwidth list (~14M parameters)"
    )
    parser.add_argument(
        "--impls", nargs="+", choices=OUTER_IMPLS, default=list(OUTER_IMPLS),
        help="outer_impl paths to check (e.g. skip the slow-to-compile 'compiled' on CPU)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None, help="bandwidth repetitions")
    parser.add_argument("--out", type=Path, default=None, help="also write a JSON report")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    begin = time.perf_counter()
    problem, half_phi = make_problem(), half_phi_problem()
    rows = []
    for (_, impl), group in itertools.groupby(cases(args.impls), lambda c: (c.method, c.impl)):
        if impl == "compiled":
            # a fresh dynamo cache per method: its compiled cases are 5 graphs, the later
            # ones must not fail on the recompile limit (8 graphs per function)
            torch._dynamo.reset()
        for case in group:
            rows.append(check(case, half_phi if case.phi_dtype in HALF else problem, device))
    rows += sub_ulp_rows(device)
    shapes = mbert_shapes(vocab=8192, layers=1) if quick else mbert_shapes()
    bw_rows: list[BandwidthRow] = []
    try:
        bw_rows = bandwidth(device, shapes, args.impls, args.rounds or (5 if quick else 50))
    except Exception as error:  # e.g. the compiled path failing to compile: a failed check
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        nan = math.nan
        rows.append(
            Row("bandwidth", "fp32", str(device), str(device), nan, nan, 0, 0, False, message)
        )
    print_table(rows, bw_rows)
    failed = [r.path for r in rows if not r.ok]
    elapsed = time.perf_counter() - begin
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks OK on {device} in {elapsed:.1f} s")
    if args.out is not None:
        report = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
            "torch": torch.__version__,
            "quick": quick,
            "ok": not failed,
            "checks": [{k: _finite(v) for k, v in asdict(r).items()} for r in rows],
            "bandwidth": [asdict(b) for b in bw_rows],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
