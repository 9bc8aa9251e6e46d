"""Measured convergence rates of the paper's Taylor expansions, through the library.

For random problems drawn like the property tests in ``tests/test_theory.py`` draw them, and
with *the same code* (``measure`` / ``measure_cross_task``), fits the log-log slope of

* ``appendix_c``: SeqReptile, one task sequence: |MG/alpha - (sum gbar - alpha sum H gbar)|
  (expected 2);
* ``eq7``: SeqReptile, exact expectation over all T^K sequences: |E[MG]/alpha - grad(Eq. 7)|
  (expected 2);
* ``eq4``: Reptile: |MG/alpha - grad(Eq. 4)| (expected 2);
* the same with the alpha term dropped (``dropped``) or its sign flipped (``flipped``)
  (expected 1: the wrong expansions the tests must reject);
* ``cross_task``: cone tasks, |c(alpha) + (P/2) grad X_p| for SeqReptile's O(alpha)
  correction c (expected 1) and the intra-task-only prediction |c(alpha)| (expected 0).

Run: ``python -m benchmarks.theory.measure_slopes [--draws N] [--seed S]``. Prints a table
and writes ``benchmarks/results/theory_slopes.json``; docs/theory.md quotes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tests.test_theory import (
    F64,
    FAMILIES,
    NUM_ALPHAS,
    RATIO,
    RESOLVE,
    SLOPE_TOL,
    STEP_SCALE,
    Measurement,
    SmoothTasks,
    all_sequences,
    loglog_slope,
    measure,
    measure_cross_task,
    objective_gradients,
    paper_terms,
    reptile_sequences,
    roundoff,
    run_reptile,
    run_seqreptile,
    taylor_coefficients,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)


def draw_tasks(
    rng: np.random.Generator, family: str, max_tasks: int, max_steps: int
) -> tuple[SmoothTasks, int]:
    num_tasks = int(rng.integers(1, max_tasks + 1))
    tasks = SmoothTasks(family, num_tasks, int(rng.integers(1, 7)), int(rng.integers(2**32)))
    return tasks, int(rng.integers(2, max_steps + 1))


def probabilities(rng: np.random.Generator, num_tasks: int) -> list[float]:
    raw = rng.uniform(0.05, 1.0, num_tasks)
    return [float(r) for r in raw / raw.sum()]


def appendix_c(rng: np.random.Generator, family: str, outer_lr: float) -> Measurement:
    tasks, inner_steps = draw_tasks(rng, family, 4, 6)
    sequence = tuple(int(t) for t in rng.integers(0, tasks.num_tasks, inner_steps))
    c = taylor_coefficients(tasks, [sequence], [1.0])
    c0, c1 = paper_terms(tasks, [sequence], [1.0])
    rows = torch.tensor([sequence])

    def scaled(alpha: float) -> Tensor:
        return run_seqreptile(tasks, rows, alpha, outer_lr)[0][0] / alpha

    return measure(tasks, scaled, lambda a: c0 + a * c1, c, inner_steps, outer_lr)


def eq7(rng: np.random.Generator, family: str, outer_lr: float) -> Measurement:
    tasks, inner_steps = draw_tasks(rng, family, 3, 4)
    p = probabilities(rng, tasks.num_tasks)
    sequences, weights = all_sequences(tasks.num_tasks, inner_steps, p)
    c = taylor_coefficients(tasks, sequences, weights)
    g0, g1 = objective_gradients(tasks, sequences, weights)
    w = torch.tensor(weights, dtype=F64)
    rows = torch.tensor(sequences)

    def scaled(alpha: float) -> Tensor:
        return w @ run_seqreptile(tasks, rows, alpha, outer_lr)[0] / alpha

    return measure(tasks, scaled, lambda a: g0 - a / 2 * g1, c, inner_steps, outer_lr)


def eq4(rng: np.random.Generator, family: str, outer_lr: float) -> Measurement:
    tasks, inner_steps = draw_tasks(rng, family, 4, 5)
    sequences, weights = reptile_sequences(tasks.num_tasks, inner_steps)
    c = taylor_coefficients(tasks, sequences, weights)
    g0, g1 = objective_gradients(tasks, sequences, weights)

    def scaled(alpha: float) -> Tensor:
        return run_reptile(tasks, inner_steps, alpha, outer_lr)[0] / alpha

    return measure(tasks, scaled, lambda a: g0 - a / 2 * g1, c, inner_steps, outer_lr)


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def halving_ratio(residuals: list[float]) -> float:
    """Geometric mean of r(alpha) / r(alpha / 2) over the grid (4 for an alpha^2 residual)."""
    logs = [math.log(a / b) for a, b in itertools.pairwise(residuals)]
    return math.exp(statistics.fmean(logs))


def second_order_claim(
    run: Callable[[np.random.Generator, str, float], Measurement],
    rng: np.random.Generator,
    draws: int,
) -> dict[str, object]:
    out: dict[str, object] = {}
    for family in FAMILIES:
        slopes, dropped, flipped, ratios, leading_err, exact_ratio = [], [], [], [], [], []
        skipped = 0
        while len(slopes) + len(exact_ratio) < draws:
            outer_lr = float(rng.uniform(0.1, 1.0))
            m = run(rng, family, outer_lr)
            if not m.resolvable:
                skipped += 1
                continue
            dropped.append(loglog_slope(m.alphas, m.dropped))
            flipped.append(loglog_slope(m.alphas, m.flipped))
            if m.exact:  # quadratic, K = 2: residual / generous rounding bound
                exact_ratio.append(max(r / b for r, b in zip(m.residuals, m.bounds)))
                continue
            slopes.append(loglog_slope(m.alphas, m.residuals))
            ratios.append(halving_ratio(m.residuals))
            leading_err.append(float((m.leading - m.c2).norm() / m.c2.norm()))
        out[family] = {
            "slope": summary(slopes),
            "within_tolerance": sum(abs(s - 2) <= SLOPE_TOL for s in slopes) / max(len(slopes), 1),
            "halving_ratio": summary(ratios),
            "leading_coefficient_rel_error": summary(leading_err),
            "slope_alpha_term_dropped": summary(dropped),
            "slope_alpha_term_flipped": summary(flipped),
            "wrong_rejected": sum(abs(s - 2) > SLOPE_TOL for s in dropped + flipped)
            / max(len(dropped + flipped), 1),
            "exact_cases_max_residual_over_bound": summary(exact_ratio),
            "skipped_unresolvable": skipped,
        }
    return out


def cross_task_claim(rng: np.random.Generator, draws: int) -> dict[str, object]:
    slopes, intra, reptile_rel, reptile_wrong = [], [], [], []
    skipped = 0
    while len(slopes) < draws:
        num_tasks = int(rng.integers(2, 4))
        tasks = SmoothTasks("cone", num_tasks, int(rng.integers(2, 6)), int(rng.integers(2**32)))
        outer_lr = float(rng.uniform(0.1, 1.0))
        m = measure_cross_task(
            tasks, probabilities(rng, num_tasks), int(rng.integers(2, 5)), outer_lr
        )
        if not m.resolvable:
            skipped += 1
            continue
        slopes.append(loglog_slope(m.alphas, m.seq_residuals))
        intra.append(loglog_slope(m.alphas, m.seq_intra_only))
        reptile_wrong.append(loglog_slope(m.alphas, m.reptile_residuals))
        reptile_rel.append(
            max(
                r / (roundoff(tasks, a, outer_lr) / a)
                for a, r in zip(m.alphas, m.reptile_correction)
            )
        )
    return {
        "seqreptile_slope_vs_cross_task_target": summary(slopes),
        "seqreptile_slope_vs_intra_task_only_target": summary(intra),
        "reptile_slope_vs_cross_task_target": summary(reptile_wrong),
        "reptile_correction_over_rounding_bound": summary(reptile_rel),
        "skipped_unresolvable": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=40, help="problems per claim and family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "theory_slopes.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    results = {
        "machine": {
            "processor": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {
            "draws_per_family": args.draws,
            "seed": args.seed,
            "num_alphas": NUM_ALPHAS,
            "alpha0": f"min({STEP_SCALE}/(K*curvature), {RATIO}|c1|/|c2|, {RATIO}|c2|/|c3|)",
            "resolve": RESOLVE,
            "slope_tolerance": SLOPE_TOL,
            "dtype": "float64",
        },
        "appendix_c": second_order_claim(appendix_c, rng, args.draws),
        "eq7": second_order_claim(eq7, rng, args.draws),
        "eq4": second_order_claim(eq4, rng, args.draws),
        "cross_task": cross_task_claim(rng, args.draws),
    }
    results["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'claim':<12}{'family':<11}{'slope mean [min, max]':<28}{'dropped':>9}{'flipped':>9}")
    for claim in ("appendix_c", "eq7", "eq4"):
        for family, r in results[claim].items():  # type: ignore[union-attr]
            s, d, f = r["slope"], r["slope_alpha_term_dropped"], r["slope_alpha_term_flipped"]
            span = f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if s["n"] else "-"
            print(f"{claim:<12}{family:<11}{span:<28}{d['mean']:>9.3f}{f['mean']:>9.3f}")
    ct = results["cross_task"]
    s = ct["seqreptile_slope_vs_cross_task_target"]  # type: ignore[index]
    print(
        f"cross_task  cone       {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}] (expected 1); "
        f"intra-only {ct['seqreptile_slope_vs_intra_task_only_target']['mean']:.3f}, "  # type: ignore[index]
        f"Reptile vs cross {ct['reptile_slope_vs_cross_task_target']['mean']:.3f} (expected 0)"  # type: ignore[index]
    )
    print(f"wrote {args.out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
