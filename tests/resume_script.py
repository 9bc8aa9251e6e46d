"""Train SeqReptile or Reptile for some steps, optionally stopping at a checkpoint or resuming.

Run as ``python -m tests.resume_script METHOD STEPS OUT [--stop-at M] [--resume CKPT]``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from torch_seqreptile import Reptile, SeqReptile, TaskBatchSampler

SIZES = [40, 25, 60]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=["seqreptile", "reptile"])
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = torch.randn(sum(SIZES), 6)
    targets = torch.randn(sum(SIZES), 1)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    if args.method == "seqreptile":
        opt: SeqReptile | Reptile = SeqReptile(inner, 4, 0.3, outer_momentum=0.5, nesterov=True)
        sampler = TaskBatchSampler(SIZES, 5, q=0.5, seed=3, num_batches=7)
    else:
        opt = Reptile(inner, 3, 0.3, num_tasks=3)
        sampler = TaskBatchSampler(SIZES, 5, seed=3, task_order="cyclic", steps_per_task=3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    step = 0
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.load_state_dict(checkpoint["sampler"])
        step = checkpoint["step"]
    while step < args.steps:
        for indices in sampler:
            loss = (model(data[indices]) - targets[indices]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            if step == args.stop_at:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "step": step,
                    },
                    args.out,
                )
                return
            if step == args.steps:
                break
    slow = {i: entry["slow_weight"] for i, entry in opt.state_dict()["state"].items()}
    torch.save({"model": model.state_dict(), "slow": slow}, args.out)


if __name__ == "__main__":
    main()
