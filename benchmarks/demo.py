"""A short, runnable tour of SeqReptile on a small multi-task problem.

Four regression tasks share a two-layer trunk and have their own heads; their targets are
related but partly conflicting. Three runs see the same number of single-task batches:

* ``sequential``: the inner AdamW alone on single-task batches (SeqReptile, outer_lr = 1);
* ``seqreptile``: K inner steps on single-task batches, then phi <- phi - eta (phi - theta_K);
* ``mtl``: each AdamW step averages one batch of every task (fewer, larger steps).

It prints the held-out loss per task and the mean pairwise cosine between task gradients of
the shared trunk (the quantity of the paper's Fig. 4) for the weights each method keeps.

Run: ``python -m benchmarks.demo`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from torch_seqreptile import MultiTaskBatchSampler, SeqReptile, TaskBatchSampler

NUM_TASKS = 4
DIM = 16


class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(NUM_TASKS))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x)).squeeze(-1)


def make_tasks(
    sizes: list[int], seed: int, input_seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and task ids: y = sin(3 w·x) + 0.5 sin(3 w_t·x) + noise.

    ``seed`` fixes the task functions (w shared, w_t per task), ``input_seed`` the examples.
    """
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(DIM, generator=g) / DIM**0.5
    own = torch.randn(NUM_TASKS, DIM, generator=g) / DIM**0.5
    g.manual_seed(input_seed)
    xs, ys, ts = [], [], []
    for task, n in enumerate(sizes):
        x = torch.randn(n, DIM, generator=g)
        y = torch.sin(3 * x @ shared) + 0.5 * torch.sin(3 * x @ own[task])
        xs.append(x)
        ys.append(y + 0.1 * torch.randn(n, generator=g))
        ts.append(torch.full((n,), task))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def task_losses(
    model: MultiHead, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
) -> list[torch.Tensor]:
    return [(model(x[t == task], task) - y[t == task]).pow(2).mean() for task in range(NUM_TASKS)]


def mean_pairwise_cosine(
    model: MultiHead, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
) -> float:
    trunk = list(model.trunk.parameters())
    grads = []
    for loss in task_losses(model, x, y, t):
        flat = torch.cat([g.flatten() for g in torch.autograd.grad(loss, trunk)])
        grads.append(flat / flat.norm())
    cosines = [float(a @ b) for a, b in itertools.combinations(grads, 2)]
    return sum(cosines) / len(cosines)


def train(method: str, data: tuple[torch.Tensor, ...], steps: int, seed: int) -> MultiHead:
    x, y, t = data
    sizes = torch.bincount(t, minlength=NUM_TASKS).tolist()
    torch.manual_seed(seed)
    model = MultiHead()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if method == "mtl":
        sampler = MultiTaskBatchSampler(
            sizes, 16, NUM_TASKS, seed=seed, num_batches=steps // NUM_TASKS
        )
        for indices in sampler:
            losses = task_losses(model, x[indices], y[indices], t[indices])
            inner.zero_grad()
            torch.stack(losses).mean().backward()
            inner.step()
        return model
    outer_lr = 1.0 if method == "sequential" else 0.1
    opt = SeqReptile(inner, inner_steps=20, outer_lr=outer_lr)
    for indices in TaskBatchSampler(sizes, 16, q=0.2, seed=seed, num_batches=steps):
        task = int(t[indices[0]])
        loss = (model(x[indices], task) - y[indices]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.outer_step()  # end the last trajectory: the model now holds the slow weights phi
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4000, help="single-task batches per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = [2000, 1000, 300, 100]
    train_data = make_tasks(sizes, seed=args.seed, input_seed=1)
    test_data = make_tasks([500] * NUM_TASKS, seed=args.seed, input_seed=2)
    print(
        f"4 tasks with {sizes} training examples; {args.steps} single-task batches of 16 per run\n"
    )
    header = "method       " + "  ".join(f"task{t} loss" for t in range(NUM_TASKS)) + "  mean   cos"
    print(header)
    for method in ("mtl", "sequential", "seqreptile"):
        model = train(method, train_data, args.steps, args.seed)
        losses = [float(v) for v in task_losses(model, *test_data)]
        cosine = mean_pairwise_cosine(model, *test_data)
        cells = "  ".join(f"{v:10.4f}" for v in losses)
        print(f"{method:<12} {cells}  {sum(losses) / NUM_TASKS:.4f} {cosine:+.3f}")
    print(
        "\nloss: held-out MSE per task; cos: mean pairwise cosine of the task gradients of the "
        "shared trunk at the final weights (Fig. 4 of the paper)."
    )


if __name__ == "__main__":
    main()
