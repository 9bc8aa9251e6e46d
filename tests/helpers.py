"""Small float64 models, batches and plain reference loops written from the paper."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

InnerFactory = Callable[[list[dict[str, object]]], torch.optim.Optimizer]

INNER_OPTIMIZERS: dict[str, InnerFactory] = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.5),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
}


class TwoHeadNet(nn.Module):
    """A shared trunk, one head per task and an unused parameter (never gets a gradient)."""

    def __init__(self, num_tasks: int = 3, dim: int = 5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_tasks))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.trunk(x))).squeeze(-1)


def make_model(seed: int = 0, num_tasks: int = 3) -> TwoHeadNet:
    torch.manual_seed(seed)
    return TwoHeadNet(num_tasks).double()


def param_groups(model: TwoHeadNet) -> list[dict[str, object]]:
    """Two groups with different learning-rate scales, as a user with a head lr would have."""
    return [
        {"params": [*model.trunk.parameters(), model.unused]},
        {"params": list(model.heads.parameters()), "lr_scale": 2.0},
    ]


def make_inner(name: str, model: TwoHeadNet) -> torch.optim.Optimizer:
    optimizer = INNER_OPTIMIZERS[name](param_groups(model))
    optimizer.param_groups[1]["lr"] *= 2.0
    return optimizer


def batch(step: int, num_tasks: int = 3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Deterministic single-task batch number ``step``."""
    generator = torch.Generator().manual_seed(1000 + step)
    task = int(torch.randint(num_tasks, (1,), generator=generator))
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(6, generator=generator, dtype=torch.float64) + task
    return x, y, task


def loss_at(model: TwoHeadNet, step: int, task: int | None = None) -> torch.Tensor:
    x, y, drawn = batch(step)
    return (model(x, drawn if task is None else task) - y).pow(2).mean()


def reference_seqreptile(
    model: TwoHeadNet,
    inner: torch.optim.Optimizer,
    num_steps: int,
    inner_steps: int,
    outer_lr: float,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[torch.Tensor]:
    """Algorithm 1 literally, with the inner optimizer as line 7; returns phi."""
    params = [p for group in inner.param_groups for p in group["params"]]
    phi = [p.detach().clone() for p in params]
    for step in range(num_steps):
        inner.zero_grad()
        loss_at(model, step).backward()
        inner.step()
        if scheduler is not None:
            scheduler.step()
        if (step + 1) % inner_steps == 0:
            with torch.no_grad():
                for p, slow in zip(params, phi):
                    meta_gradient = slow - p  # line 9: MG(phi) = phi - theta_K
                    slow -= outer_lr * meta_gradient  # line 10
                    p.copy_(slow)  # line 3: theta_0 <- phi
    return phi


def reference_reptile(
    model: TwoHeadNet,
    inner: torch.optim.Optimizer,
    num_rounds: int,
    inner_steps: int,
    outer_lr: float,
    num_tasks: int,
) -> list[torch.Tensor]:
    """Eq. 2-3 literally: T trajectories from the same phi, then phi moves to their mean."""
    params = [p for group in inner.param_groups for p in group["params"]]
    phi = [p.detach().clone() for p in params]
    step = 0
    for _ in range(num_rounds):
        ends = []
        for task in range(num_tasks):
            with torch.no_grad():
                for p, slow in zip(params, phi):
                    p.copy_(slow)  # theta_t^(0) = phi
            for _ in range(inner_steps):
                inner.zero_grad()
                loss_at(model, step, task).backward()
                inner.step()
                step += 1
            ends.append([p.detach().clone() for p in params])
        with torch.no_grad():
            for i, (p, slow) in enumerate(zip(params, phi)):
                mean_meta_gradient = sum(slow - end[i] for end in ends) / num_tasks
                slow -= outer_lr * mean_meta_gradient
                p.copy_(slow)
    return phi


def slow_by_index(opt: torch.optim.Optimizer, key: str = "slow_weight") -> dict[int, torch.Tensor]:
    """``opt.state[p][key]`` (phi by default) of every tracked parameter, by its index."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return {i: opt.state[p][key] for i, p in enumerate(params) if key in opt.state.get(p, {})}


def step_counter(opt: torch.optim.Optimizer) -> list[int]:
    """A list that grows by one at every completed ``opt.step()`` (a step post-hook)."""
    calls: list[int] = []
    opt.register_step_post_hook(lambda *_: calls.append(len(calls)))
    return calls
