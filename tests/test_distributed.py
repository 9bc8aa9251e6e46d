"""Two processes on the gloo backend over loopback: DDP, parallel Reptile, FSDP2, resume, failure.

Each launch starts ``tests/distributed_worker.py`` twice (ranks 0 and 1) with a free port on
127.0.0.1 and gloo bound to the loopback interface, waits for both with a deadline and kills
whatever is still running when the test ends, passes or fails. One ``main`` launch serves
most tests (module fixture), to keep the file's wall time small.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import distributed_worker as worker
from torch_seqreptile import Reptile

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 90.0  # a whole launch; the process group's own timeout is shorter

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


@dataclass
class Launch:
    returncodes: list[int | None]
    logs: list[str]
    seconds: float
    killed: bool

    def log(self) -> str:
        return "\n".join(
            f"--- rank {r} (rc {c})\n{t}"
            for r, (c, t) in enumerate(zip(self.returncodes, self.logs))
        )


def launch(
    scenario: str,
    out: Path,
    *,
    pg_timeout_s: float = 20.0,
    timeout_s: float = LAUNCH_TIMEOUT_S,
    wait_for: tuple[int, ...] = tuple(range(WORLD_SIZE)),
) -> Launch:
    """Run ``scenario`` on 2 ranks until the ranks ``wait_for`` exit or ``timeout_s`` passes.

    Whatever still runs then is killed, on success and on failure alike. ``seconds`` is the
    time until the ranks waited for had exited.
    """
    port = free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(WORLD_SIZE),
        "GLOO_SOCKET_IFNAME": loopback_interface(),
        "OMP_NUM_THREADS": "1",
        "SEQREPTILE_DIST_TIMEOUT": str(pg_timeout_s),
    }
    procs, log_files = [], []
    start = time.monotonic()
    killed = False
    try:
        for rank in range(WORLD_SIZE):
            log_file = open(out / f"{scenario}_rank{rank}.log", "w+")
            log_files.append(log_file)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.distributed_worker", scenario, str(out)],
                    cwd=ROOT,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = start + timeout_s
        for proc in (procs[rank] for rank in wait_for):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed = True
                break
        seconds = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        logs = []
        for log_file in log_files:
            log_file.seek(0)
            logs.append(log_file.read())
            log_file.close()
    returncodes = [proc.returncode for proc in procs]
    return Launch(returncodes, logs, seconds, killed)


def check_ok(result: Launch) -> None:
    assert not result.killed and result.returncodes == [0, 0], result.log()


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("dist_main")
    result = launch("main", out)
    check_ok(result)
    print(f"main launch: {result.seconds:.1f} s")
    ranks = [torch.load(out / f"main_rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    return out, ranks


def assert_lists_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs: max |diff| {(x - y).abs().max()}"


def assert_lists_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def snapshots(history: list[dict[str, list[torch.Tensor]]]) -> Iterator[list[torch.Tensor]]:
    for snap in history:
        yield snap["phi"]
        yield snap["theta"]


# ---------------------------------------------------------------- SeqReptile under DDP
def test_ddp_ranks_stay_bit_identical(main_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (rank0, rank1) = main_run
    h0, h1 = rank0["ddp"]["history"], rank1["ddp"]["history"]
    assert len(h0) == len(h1) == worker.DDP_STEPS // worker.DDP_INNER_STEPS
    for s0, s1 in zip(snapshots(h0), snapshots(h1)):
        assert_lists_equal(s0, s1)
    for key in ("phi", "theta"):
        assert_lists_equal(rank0["ddp"]["final"][key], rank1["ddp"]["final"][key])
    first, last = h0[0]["phi"], rank0["ddp"]["final"]["phi"]
    assert any(not torch.equal(x, y) for x, y in zip(first, last))  # it did train


def test_ddp_equals_single_process_on_concatenated_batches(
    main_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, _) = main_run
    reference = worker.ddp_reference()
    assert len(reference["history"]) == len(rank0["ddp"]["history"])
    for got, expected in zip(snapshots(rank0["ddp"]["history"]), snapshots(reference["history"])):
        assert_lists_close(got, expected)
    for key in ("phi", "theta"):
        assert_lists_close(rank0["ddp"]["final"][key], reference["final"][key])


def test_checkpoint_from_rank0_resumes_two_process_run_exactly(
    main_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, ranks = main_run
    checkpoint = torch.load(out / "ddp_checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == worker.DDP_STOP_AT
    assert checkpoint["optimizer"]["param_groups"][0]["trajectory_step"] == (
        worker.DDP_STOP_AT % worker.DDP_INNER_STEPS
    )
    result = launch("resume", out)
    check_ok(result)
    for rank in range(WORLD_SIZE):
        resumed = torch.load(out / f"resume_rank{rank}.pt", weights_only=True)["ddp"]
        full = ranks[rank]["ddp"]
        assert resumed["step"] == full["step"] == worker.DDP_STEPS
        for key in ("phi", "theta"):
            assert_lists_equal(resumed["final"][key], full["final"][key])
        # the outer updates after the checkpoint, too
        done = worker.DDP_STOP_AT // worker.DDP_INNER_STEPS
        for got, expected in zip(snapshots(resumed["history"]), snapshots(full["history"][done:])):
            assert_lists_equal(got, expected)


# ---------------------------------------------------------------- parallel Reptile
@pytest.mark.parametrize("layout_index", range(len(worker.REPTILE_LAYOUTS)))
def test_parallel_reptile_equals_serial_reptile(
    main_run: tuple[Path, list[dict[str, Any]]], layout_index: int
) -> None:
    _, ranks = main_run
    layout = worker.REPTILE_LAYOUTS[layout_index]
    num_tasks = layout[0]
    runs = [rank["reptile"][layout_index] for rank in ranks]
    # every rank is told its own task: r, r + P, ... (mod T)
    per_rank = max(1, num_tasks // WORLD_SIZE)
    for rank, run in enumerate(runs):
        expected_tasks = [
            (rank + WORLD_SIZE * j) % num_tasks
            for _ in range(worker.REPTILE_ROUNDS)
            for j in range(per_rank)
            for _ in range(worker.REPTILE_INNER_STEPS)
        ]
        assert run["tasks"] == expected_tasks
    # ranks hold bit-identical phi and theta after every round
    assert len(runs[0]["history"]) == worker.REPTILE_ROUNDS
    for s0, s1 in zip(snapshots(runs[0]["history"]), snapshots(runs[1]["history"])):
        assert_lists_equal(s0, s1)
    reference = worker.serial_reptile_reference(layout, WORLD_SIZE)
    for got, expected in zip(snapshots(runs[0]["history"]), snapshots(reference)):
        assert_lists_close(got, expected)
    # every head moved, including those of the other rank's tasks
    initial = worker.make_model(seed=3, num_tasks=num_tasks)
    final_phi = runs[0]["history"][-1]["phi"]
    for initial_param, phi in zip(initial.parameters(), final_phi):
        if initial_param.shape == torch.Size([3]):  # the parameter no task uses
            assert torch.equal(initial_param.detach(), phi)
        else:
            assert not torch.equal(initial_param.detach(), phi)


def test_parallel_reptile_resumes_from_per_rank_checkpoints(
    main_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, ranks = main_run
    for rank in ranks:
        assert_lists_equal(rank["reptile_resume"]["resumed"], rank["reptile_resume"]["full"])
    assert_lists_equal(ranks[0]["reptile_resume"]["full"], ranks[1]["reptile_resume"]["full"])


# ---------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("impl", ["foreach", "per_tensor"])
def test_fsdp2_outer_update_and_state_dict_on_sharded_parameters(
    main_run: tuple[Path, list[dict[str, Any]]], impl: str
) -> None:
    _, ranks = main_run
    reference = worker.fsdp_reference()
    for rank in ranks:
        run = rank["fsdp"][impl]
        assert all(run["params_are_dtensors"])
        assert all(run["slow_are_dtensors"]) and all(run["saved_are_dtensors"])
        assert_lists_close(run["phi"], reference["phi"])
        assert_lists_close(run["theta"], reference["theta"])
        assert_lists_equal(run["resumed_phi"], run["phi"])
        assert_lists_equal(run["resumed_theta"], run["theta"])
    # the parameters really are sharded: each rank holds a part
    local = [rank["fsdp"][impl]["local_numels"] for rank in ranks]
    assert [a + b for a, b in zip(*local)] == [t.numel() for t in reference["theta"]]
    assert local[0] != [t.numel() for t in reference["theta"]]


def test_parallel_argument_errors(main_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = main_run
    for rank in ranks:
        wrong_num_tasks, wrong_group_size = rank["errors"]
        assert "num_tasks must be a multiple or a divisor of the process group size 2" in (
            wrong_num_tasks
        )
        assert "got 3" in wrong_num_tasks
        assert "over 1 parallel rank(s), this one runs over 2" in wrong_group_size


def test_parallel_needs_an_initialised_process_group() -> None:
    model = worker.make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            Reptile(inner, 2, 0.5, 3, parallel=True)
    with pytest.raises(ValueError, match="process_group is only used with parallel=True"):
        Reptile(inner, 2, 0.5, 3, process_group=object())
    serial = Reptile(inner, 2, 0.5, 3)
    assert (serial.rank, serial.group_size, serial.trajectories_per_round) == (0, 1, 3)
    assert serial.state_dict()["param_groups"][0]["process_group_size"] == 1


# ---------------------------------------------------------------- failure
FAILURES = ("raise_and_exit", "raise_and_linger")
FAILURE_PG_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def failure_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    """Both failure scenarios, launched side by side (their ranks mostly wait)."""
    outs = {scenario: tmp_path_factory.mktemp(scenario) for scenario in FAILURES}
    with concurrent.futures.ThreadPoolExecutor(len(FAILURES)) as pool:
        futures = {
            scenario: pool.submit(
                launch,
                scenario,
                outs[scenario],
                pg_timeout_s=FAILURE_PG_TIMEOUT_S,
                timeout_s=45.0,
                wait_for=(0,),
            )
            for scenario in FAILURES
        }
        return {scenario: future.result() for scenario, future in futures.items()}


@pytest.mark.parametrize("scenario", FAILURES)
def test_a_rank_that_raises_does_not_hang_the_others(
    failure_runs: dict[str, Launch], scenario: str
) -> None:
    """Rank 1 raises before the end-of-round all-reduce, then exits or lingers.

    Rank 0 must end by itself with an error from the collective: at once when the peer's
    connection closes, after the process group's timeout when the peer stays alive. The
    launcher's deadline (45 s) kills it otherwise, which fails the test.
    """
    result = failure_runs[scenario]
    assert not result.killed, result.log()  # rank 0 ended by itself ...
    assert result.returncodes[0] not in (0, None), result.log()  # ... with an error
    assert "rank 1 failed" in result.logs[1], result.log()
    assert "all_reduce" in result.logs[0], result.log()  # it failed in the collective
    expected = "Connection closed by peer" if scenario == "raise_and_exit" else "Timed out"
    assert expected in result.logs[0], result.log()
    print(f"{scenario}: rank 0 failed after {result.seconds:.1f} s")
