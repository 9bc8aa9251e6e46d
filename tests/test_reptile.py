"""Reptile against a literal float64 transcription of Eq. 2-3."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    INNER_OPTIMIZERS,
    loss_at,
    make_inner,
    make_model,
    reference_reptile,
    slow_by_index,
)
from torch_seqreptile import Reptile, SeqReptile, TaskBatchSampler


def run_reptile(
    inner_name: str, num_steps: int, inner_steps: int, outer_lr: float, num_tasks: int
) -> tuple[torch.nn.Module, Reptile, list[int]]:
    model = make_model(num_tasks=num_tasks)
    opt = Reptile(make_inner(inner_name, model), inner_steps, outer_lr, num_tasks)
    fed = []
    for step in range(num_steps):
        fed.append(opt.current_task)
        opt.zero_grad()
        loss_at(model, step, opt.current_task).backward()
        opt.step()
    return model, opt, fed


@pytest.mark.parametrize("inner_name", sorted(INNER_OPTIMIZERS))
@pytest.mark.parametrize("seed", range(3))
def test_matches_eq_2_3(inner_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inner_steps = int(torch.randint(1, 4, (1,), generator=generator))
    outer_lr = float(torch.rand((), generator=generator, dtype=torch.float64))
    num_rounds = 2
    model, opt, fed = run_reptile(
        inner_name, num_rounds * 3 * inner_steps, inner_steps, outer_lr, 3
    )
    ref_model = make_model(num_tasks=3)
    ref_phi = reference_reptile(
        ref_model, make_inner(inner_name, ref_model), num_rounds, inner_steps, outer_lr, 3
    )
    torch.testing.assert_close(model.state_dict(), ref_model.state_dict(), rtol=1e-12, atol=1e-12)
    params = list(opt.params())
    for index, expected in enumerate(ref_phi):
        torch.testing.assert_close(slow_by_index(opt).get(index, params[index]), expected)
    assert fed == [t for _ in range(num_rounds) for t in range(3) for _ in range(inner_steps)]


def test_cyclic_sampler_feeds_the_order_reptile_asks_for() -> None:
    sampler = TaskBatchSampler([4, 9, 6], 2, task_order="cyclic", steps_per_task=3, num_batches=18)
    model = make_model()
    opt = Reptile(torch.optim.SGD(model.parameters(), lr=0.1), 3, 0.5, num_tasks=3)
    for indices in sampler:
        assert sampler.task_of(indices[0]) == opt.current_task
        opt.zero_grad()
        loss_at(model, 0, opt.current_task).backward()
        opt.step()


def test_one_task_equals_seqreptile() -> None:
    reptile_model, _, _ = run_reptile("adam", 10, 3, 0.4, 1)
    model = make_model(num_tasks=1)
    opt = SeqReptile(make_inner("adam", model), 3, 0.4)
    for step in range(10):
        opt.zero_grad()
        loss_at(model, step, 0).backward()
        opt.step()
    torch.testing.assert_close(model.state_dict(), reptile_model.state_dict(), rtol=0, atol=0)


def test_outer_step_ends_a_partial_round_with_the_mean_so_far() -> None:
    _model, opt, _ = run_reptile("sgd", 5, 2, 0.5, 3)  # task 0 done, task 1 done, task 2 at k=1
    params = list(opt.params())
    phi = {i: s.clone() for i, s in slow_by_index(opt).items()}
    ends = {
        i: slow_by_index(opt, "endpoint_sum")[i] + params[i].detach() for i in slow_by_index(opt)
    }
    opt.outer_step()
    for i in slow_by_index(opt):
        expected = phi[i] - 0.5 * (phi[i] - ends[i] / 3)
        torch.testing.assert_close(slow_by_index(opt)[i], expected)
        torch.testing.assert_close(params[i].detach(), slow_by_index(opt)[i], rtol=0, atol=0)
    assert opt.current_task == 0 and opt.trajectory_step == 0
    assert all(bool((s == 0).all()) for s in slow_by_index(opt, "endpoint_sum").values())
