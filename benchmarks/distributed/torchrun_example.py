"""SeqReptile under DDP or FSDP2, and parallel Reptile, launched with ``torchrun``.

One node, 2 processes (CPU/gloo, or one GPU per process with NCCL when CUDA is there)::

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed/torchrun_example.py --mode ddp
    torchrun --standalone --nproc_per_node 2 benchmarks/distributed/torchrun_example.py --mode fsdp
    torchrun --standalone --nproc_per_node 2 benchmarks/distributed/torchrun_example.py --mode reptile

Several nodes: the same command on every node, with ``--nnodes N --rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id JOB`` instead of ``--standalone`` (docs/distributed.md).

The tasks are synthetic regressions of different sizes that share most of their weights.
At the end every rank reports its loss on each task with the slow weights phi, the
time per inner step, and (DDP, Reptile) a checksum of phi that must be the same on all
ranks; ``--save DIR`` writes a checkpoint (rank 0 only under DDP; one file per rank under
FSDP2 and parallel Reptile, whose ranks hold different shards / inner states).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from torch_seqreptile import Reptile, SeqReptile, TaskBatchSampler

TASK_SIZES = [800, 200, 100, 500]  # unbalanced, as languages are
DIM = 16


def task_datasets(seed: int = 0) -> list[TensorDataset]:
    """Task t: y = <w + u_t, x> + noise, with x carrying a one-hot task id."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(DIM, generator=generator)
    datasets = []
    for task, size in enumerate(TASK_SIZES):
        own = 0.5 * torch.randn(DIM, generator=generator)
        x = torch.randn(size, DIM, generator=generator)
        y = x @ (shared + own) + 0.1 * torch.randn(size, generator=generator)
        task_id = torch.zeros(size, len(TASK_SIZES))
        task_id[:, task] = 1.0
        datasets.append(TensorDataset(torch.cat([x, task_id], dim=1), y))
    return datasets


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM + len(TASK_SIZES), 64), nn.GELU())
        self.head = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.body(x)).sum(-1)  # (not a view: FSDP2 warns on views)
        return out


def forever(loader: DataLoader[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


def checksum(tensors: list[Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp", "reptile"], default="ddp")
    parser.add_argument("--steps", type=int, default=200, help="inner steps per rank")
    parser.add_argument("--inner-steps", type=int, default=10, help="K")
    parser.add_argument("--outer-lr", type=float, default=0.5, help="eta")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument(
        "--outer-impl", choices=["foreach", "compiled", "per_tensor"], default="foreach"
    )
    parser.add_argument("--save", type=Path, help="directory for a checkpoint at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Net().to(device)
    forward: nn.Module = model
    if args.mode == "ddp":
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.body)
        fully_shard(model)  # parameters are now DTensors, sharded over the ranks
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    datasets = task_datasets()

    opt: SeqReptile | Reptile
    if args.mode == "reptile":
        # Each rank runs its own tasks' trajectories from the same phi; the end points are
        # all-reduced at the end of every round (Eq. 3, parallel form).
        opt = Reptile(
            inner, args.inner_steps, args.outer_lr, len(TASK_SIZES),
            reset_inner_state=True, outer_impl=args.outer_impl, parallel=True,
        )  # fmt: skip
        my_tasks = {
            (rank + world_size * j) % len(TASK_SIZES) for j in range(opt.trajectories_per_round)
        }
        shuffle = torch.Generator().manual_seed(rank)
        per_task = {
            task: forever(DataLoader(datasets[task], args.batch_size, True, generator=shuffle))
            for task in my_tasks
        }
        batches: Iterator[tuple[Tensor, Tensor]] = (
            next(per_task[opt.current_task]) for _ in range(args.steps)
        )
    else:
        # Every rank draws the same task at each step and a disjoint part of its batch.
        opt = SeqReptile(inner, args.inner_steps, args.outer_lr, outer_impl=args.outer_impl)
        sampler = TaskBatchSampler(
            TASK_SIZES, args.batch_size, q=0.2, seed=0, num_batches=args.steps,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        batches = iter(DataLoader(ConcatDataset(datasets), batch_sampler=sampler))

    start = time.perf_counter()
    for x, y in batches:
        loss = (forward(x.to(device)) - y.to(device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.outer_step()  # finish a partial trajectory / round: the model now holds phi
    seconds = (time.perf_counter() - start) / args.steps

    with torch.no_grad():
        losses = [
            float((model(d.tensors[0].to(device)) - d.tensors[1].to(device)).pow(2).mean())
            for d in datasets
        ]
    if args.mode == "fsdp":
        sums = "sharded (each rank holds its part of phi)"
    else:
        sums = checksum(list(model.parameters()))
    print(
        f"[rank {rank}/{world_size}] mode={args.mode} {1000 * seconds:.2f} ms/step "
        f"task losses (phi) {[round(v, 4) for v in losses]} phi checksum {sums}",
        flush=True,
    )
    if args.mode != "fsdp":
        checksums: list[str | None] = [None] * world_size
        dist.all_gather_object(checksums, sums)
        if rank == 0:
            print("ranks hold identical phi:", len(set(checksums)) == 1, flush=True)

    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        if args.mode == "ddp":
            if rank == 0:  # all ranks hold the same model and optimizer state
                torch.save(state, args.save / "checkpoint.pt")
        else:  # FSDP2: this rank's shards; parallel Reptile: this rank's inner state
            torch.save(state, args.save / f"checkpoint_rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
