"""One rank of the multi-process tests in ``tests/test_distributed.py``.

Run as ``python -m tests.distributed_worker SCENARIO OUT_DIR`` with the environment a
launcher sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); each rank writes
``OUT_DIR/<SCENARIO>_rank<RANK>.pt``. The single-process references live here too, so that
the test process computes them with exactly the same data and models.

Scenarios:

* ``main``: SeqReptile under DDP (rank 0 also writes a checkpoint mid-trajectory), parallel
  Reptile in three layouts, SeqReptile under FSDP2 with a sharded state_dict round trip.
* ``resume``: the DDP run again, from the checkpoint rank 0 wrote in ``main``.
* ``raise_and_exit`` / ``raise_and_linger``: rank 1 raises before the collective at the end
  of a parallel Reptile round and exits, or stays alive without joining it; rank 0 must
  fail within the process group's timeout instead of hanging.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.helpers import TwoHeadNet, make_model, slow_by_index
from torch_seqreptile import Reptile, SeqReptile, TaskBatchSampler

# ---------------------------------------------------------------- SeqReptile under DDP
DDP_SIZES = [12, 20, 16]
DDP_BATCH = 4  # per rank; the single-process reference uses DDP_BATCH * world_size
DDP_STEPS = 14  # 4 outer updates (K = 3) and 2 steps of a fifth trajectory
DDP_INNER_STEPS = 3
DDP_STOP_AT = 7  # rank 0 writes a checkpoint here: inside a trajectory
DDP_SEED = 5


def ddp_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(sum(DDP_SIZES), 5, generator=generator, dtype=torch.float64)
    y = torch.randn(sum(DDP_SIZES), generator=generator, dtype=torch.float64)
    return x, y


def make_seqreptile(model: nn.Module) -> SeqReptile:
    inner = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    return SeqReptile(inner, DDP_INNER_STEPS, 0.3, outer_momentum=0.5, nesterov=True)


def snapshot(opt: SeqReptile | Reptile) -> dict[str, list[Tensor]]:
    """phi (theta itself for parameters that have no slow copy yet) and theta."""
    params = [p.detach() for p in opt.params()]
    phi = [slow_by_index(opt).get(i, p).detach().clone() for i, p in enumerate(params)]
    return {"phi": phi, "theta": [p.clone() for p in params]}


def train_seqreptile(
    model: TwoHeadNet,
    forward: nn.Module,
    rank: int,
    world_size: int,
    *,
    start: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """SeqReptile over TaskBatchSampler batches; ``forward`` is the model or its DDP wrapper."""
    x, y = ddp_data()
    opt = make_seqreptile(model)
    sampler = TaskBatchSampler(
        DDP_SIZES, DDP_BATCH * (2 if world_size == 1 else 1), q=0.5, seed=DDP_SEED,
        num_batches=DDP_STEPS, rank=rank, world_size=world_size,
    )  # fmt: skip
    step = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        sampler.load_state_dict(start["sampler"])
        step = start["step"]
    history = []
    for indices in sampler:
        task = sampler.task_of(indices[0])
        loss = (forward(x[indices], task) - y[indices]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if opt.trajectory_step == 0:
            history.append(snapshot(opt))
        if step == DDP_STOP_AT and checkpoint is not None:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "sampler": sampler.state_dict(),
                "step": step,
            }
            torch.save(state, checkpoint)
    return {"history": history, "final": snapshot(opt), "step": step}


def ddp_run(rank: int, world_size: int, out: Path, start: dict[str, Any] | None) -> dict[str, Any]:
    model = make_model(seed=DDP_SEED, num_tasks=len(DDP_SIZES))
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    checkpoint = out / "ddp_checkpoint.pt" if rank == 0 and start is None else None
    return train_seqreptile(model, ddp, rank, world_size, start=start, checkpoint=checkpoint)


def ddp_reference() -> dict[str, Any]:
    """The DDP run in one process, on the concatenated batches of both ranks."""
    model = make_model(seed=DDP_SEED, num_tasks=len(DDP_SIZES))
    return train_seqreptile(model, model, 0, 1)


# ---------------------------------------------------------------- parallel Reptile
# (num_tasks, inner optimizer, reset_inner_state); 2 ranks: one task per rank, two tasks
# per rank, two ranks on the one task.
REPTILE_LAYOUTS = [(2, "adam", True), (4, "sgd", False), (1, "adam", True)]
REPTILE_ROUNDS = 3
REPTILE_INNER_STEPS = 2
REPTILE_STOP_AT = 7  # round 2 (4 steps per round), second trajectory, first step


def reptile_batch(round_: int, slot: int, k: int) -> tuple[Tensor, Tensor]:
    """The k-th batch of trajectory ``slot`` in round ``round_`` (same data serial/parallel)."""
    generator = torch.Generator().manual_seed(10_000 * round_ + 100 * slot + k)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(6, generator=generator, dtype=torch.float64) + slot


def make_reptile(
    model: TwoHeadNet, layout: tuple[int, str, bool], num_tasks: int, parallel: bool
) -> Reptile:
    _, inner_name, reset = layout
    inner: torch.optim.Optimizer
    if inner_name == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=0.03)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
    return Reptile(
        inner, REPTILE_INNER_STEPS, 0.6, num_tasks, reset_inner_state=reset, parallel=parallel
    )


def reptile_steps(
    model: TwoHeadNet, opt: Reptile, num_tasks: int, slot_of: Callable[[], int]
) -> Iterator[None]:
    """Train; yield after every step. ``slot_of()`` names the trajectory being run."""
    per_round = REPTILE_INNER_STEPS * opt.trajectories_per_round
    for round_ in range(REPTILE_ROUNDS):
        for _ in range(per_round):
            slot = slot_of()
            x, y = reptile_batch(round_, slot, opt.trajectory_step)
            opt.zero_grad()
            (model(x, slot % num_tasks) - y).pow(2).mean().backward()
            opt.step()
            yield


def parallel_reptile_run(layout: tuple[int, str, bool]) -> dict[str, Any]:
    num_tasks = layout[0]
    model = make_model(seed=3, num_tasks=num_tasks)
    opt = make_reptile(model, layout, num_tasks, parallel=True)
    history, tasks = [], []

    def slot_of() -> int:  # rank r runs slots r, r + P, ... (task = slot mod T)
        tasks.append(opt.current_task)
        return opt.rank + opt.group_size * opt.trajectory_index

    for _ in reptile_steps(model, opt, num_tasks, slot_of):
        if opt.trajectory_step == 0 and opt.trajectory_index == 0:
            history.append(snapshot(opt))
    return {"history": history, "tasks": tasks}


def serial_reptile_reference(
    layout: tuple[int, str, bool], world_size: int
) -> list[dict[str, list[Tensor]]]:
    """Serial Reptile over the same S = max(T, P) trajectories (slot s runs task s mod T)."""
    num_tasks = layout[0]
    model = make_model(seed=3, num_tasks=num_tasks)
    opt = make_reptile(model, layout, max(num_tasks, world_size), parallel=False)
    history = []
    for _ in reptile_steps(model, opt, num_tasks, lambda: opt.current_task):
        if opt.trajectory_step == 0 and opt.trajectory_index == 0:
            history.append(snapshot(opt))
    return history


def parallel_reptile_resume(rank: int, out: Path) -> dict[str, list[Tensor]]:
    """Per-rank checkpoint mid-round (Adam state kept: ranks' inner states differ)."""
    layout = (4, "adam", False)
    runs = []
    for resume in (False, True):
        model = make_model(seed=3, num_tasks=4)
        opt = make_reptile(model, layout, 4, parallel=True)
        path = out / f"reptile_checkpoint_rank{rank}.pt"
        slot_of = functools.partial(lambda o: o.rank + 2 * o.trajectory_index, opt)
        for step, _ in enumerate(reptile_steps(model, opt, 4, slot_of), start=1):
            if step == REPTILE_STOP_AT and not resume:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            if step == REPTILE_STOP_AT and resume:
                with torch.no_grad():  # wipe everything the checkpoint must restore
                    for param in model.parameters():
                        param.zero_()
                opt.optimizer.state.clear()
                opt.state.clear()
                for group in opt.param_groups:
                    group["trajectory_index"] = group["trajectory_step"] = 0
                state = torch.load(path, weights_only=True)
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
        runs.append(snapshot(opt))
    return {"full": runs[0]["phi"] + runs[0]["theta"], "resumed": runs[1]["phi"] + runs[1]["theta"]}


# ---------------------------------------------------------------- SeqReptile under FSDP2
FSDP_STEPS = 10
FSDP_STOP_AT = 5


class Trunk(nn.Module):
    """Every parameter is used by every task (the task shifts the target)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x))).squeeze(-1)


def fsdp_model(shard: bool) -> Trunk:
    torch.manual_seed(7)
    model = Trunk().double()
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.inp)
        fully_shard(model)
    return model


def fsdp_train(
    model: Trunk,
    opt: SeqReptile,
    steps: range,
    rank: int,
    world_size: int,
) -> None:
    x, y = ddp_data()
    for step in steps:
        generator = torch.Generator().manual_seed(500 + step)
        task = int(torch.randint(len(DDP_SIZES), (1,), generator=generator))
        rows = torch.randperm(x.shape[0], generator=generator)[:8][rank::world_size]
        loss = (model(x[rows]) - y[rows] - task).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def fsdp_optimizer(model: Trunk, impl: str) -> SeqReptile:
    inner = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    return SeqReptile(inner, 3, 0.4, outer_momentum=0.5, outer_impl=impl)


def full(tensor: Tensor) -> Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def fsdp_run(rank: int, world_size: int, out: Path) -> dict[str, Any]:
    """Train, save this rank's shards mid-trajectory, finish; resume a fresh copy, finish."""
    from torch.distributed.tensor import DTensor  # (slow import, only needed here)

    results: dict[str, Any] = {}
    for impl in ("foreach", "per_tensor"):
        model = fsdp_model(shard=True)
        opt = fsdp_optimizer(model, impl)
        fsdp_train(model, opt, range(FSDP_STOP_AT), rank, world_size)
        path = out / f"fsdp_{impl}_rank{rank}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        fsdp_train(model, opt, range(FSDP_STOP_AT, FSDP_STEPS), rank, world_size)

        resumed = fsdp_model(shard=True)
        resumed_opt = fsdp_optimizer(resumed, impl)
        state = torch.load(path, weights_only=True)
        resumed.load_state_dict(state["model"])
        resumed_opt.load_state_dict(state["optimizer"])
        fsdp_train(resumed, resumed_opt, range(FSDP_STOP_AT, FSDP_STEPS), rank, world_size)
        results[impl] = {
            "params_are_dtensors": [isinstance(p, DTensor) for p in model.parameters()],
            "slow_are_dtensors": [isinstance(s, DTensor) for s in slow_by_index(opt).values()],
            "saved_are_dtensors": [
                isinstance(s["slow_weight"], DTensor) for s in state["optimizer"]["state"].values()
            ],
            "local_numels": [p.to_local().numel() for p in model.parameters()],
            "phi": [full(slow_by_index(opt)[i]) for i in sorted(slow_by_index(opt))],
            "theta": [full(p) for p in model.parameters()],
            "resumed_phi": [
                full(slow_by_index(resumed_opt)[i]) for i in sorted(slow_by_index(resumed_opt))
            ],
            "resumed_theta": [full(p) for p in resumed.parameters()],
        }
    return results


def fsdp_reference() -> dict[str, list[Tensor]]:
    model = fsdp_model(shard=False)
    opt = fsdp_optimizer(model, "foreach")
    fsdp_train(model, opt, range(FSDP_STEPS), 0, 1)
    return {
        "phi": [slow_by_index(opt)[i].clone() for i in sorted(slow_by_index(opt))],
        "theta": [p.detach().clone() for p in model.parameters()],
    }


# ---------------------------------------------------------------- entry point
def argument_errors() -> list[str]:
    """Messages of the errors the parallel option raises on a 2-rank group."""
    model = make_model(seed=3, num_tasks=3)
    messages = []
    try:
        Reptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5, 3, parallel=True)
    except ValueError as error:
        messages.append(str(error))
    serial = Reptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5, 2)
    parallel = Reptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5, 2, parallel=True)
    try:
        parallel.load_state_dict(serial.state_dict())
    except ValueError as error:
        messages.append(str(error))
    return messages


def failing_rank(rank: int, linger: bool) -> None:
    """Rank 1 raises in its last inner step; rank 0 reaches the end-of-round all-reduce."""
    layout = REPTILE_LAYOUTS[0]
    model = make_model(seed=3, num_tasks=layout[0])
    opt = make_reptile(model, layout, layout[0], parallel=True)
    for step in range(REPTILE_INNER_STEPS):
        if rank == 1 and step == REPTILE_INNER_STEPS - 1:
            if linger:  # the error is caught by user code that then never joins
                try:
                    raise RuntimeError("rank 1 failed")
                except RuntimeError as error:
                    print(f"caught: {error}", file=sys.stderr, flush=True)
                    time.sleep(120)
            raise RuntimeError("rank 1 failed")
        x, y = reptile_batch(0, rank, step)
        opt.zero_grad()
        (model(x, opt.current_task) - y).pow(2).mean().backward()
        opt.step()  # the last step all-reduces the end points


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    timeout = float(os.environ.get("SEQREPTILE_DIST_TIMEOUT", "20"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    if scenario == "main":
        results["ddp"] = ddp_run(rank, world_size, out, None)
        results["reptile"] = [parallel_reptile_run(layout) for layout in REPTILE_LAYOUTS]
        results["reptile_resume"] = parallel_reptile_resume(rank, out)
        results["fsdp"] = fsdp_run(rank, world_size, out)
        results["errors"] = argument_errors()
    elif scenario == "resume":
        start = torch.load(out / "ddp_checkpoint.pt", weights_only=True, map_location="cpu")
        results["ddp"] = ddp_run(rank, world_size, out, start)
    elif scenario in ("raise_and_exit", "raise_and_linger"):
        failing_rank(rank, linger=scenario == "raise_and_linger")
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    torch.save(results, out / f"{scenario}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
