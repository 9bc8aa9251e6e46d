"""SeqReptile under torch.autocast, torch.amp.GradScaler and accelerate (what runs on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import batch, make_model, slow_by_index, step_counter
from torch_seqreptile import SeqReptile

INNER_STEPS = 3
OUTER_LR = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def float_model(seed: int = 0) -> nn.Module:
    return make_model(seed).float()


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y, task = batch(step)
    return (model(x.float(), task) - y.float()).pow(2).mean()


def reference(model: nn.Module, steps: list[int], autocast: bool) -> list[torch.Tensor]:
    """Algorithm 1 by hand with SGD as the inner optimizer; returns phi."""
    params = list(model.parameters())
    inner = torch.optim.SGD(params, lr=0.05)
    phi = [p.detach().clone() for p in params]
    for k, step in enumerate(steps):
        inner.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, step)
        loss.backward()
        inner.step()
        if (k + 1) % INNER_STEPS == 0:
            with torch.no_grad():
                for p, slow in zip(params, phi):
                    slow -= OUTER_LR * (slow - p)
                    p.copy_(slow)
    return phi


def final_phi(opt: SeqReptile) -> list[torch.Tensor]:
    params = list(opt.params())
    return [slow_by_index(opt).get(i, params[i]).detach().clone() for i in range(len(params))]


def test_autocast_bf16_matches_reference() -> None:
    model = float_model()
    expected = reference(float_model(), list(range(9)), autocast=True)
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.05), INNER_STEPS, OUTER_LR)
    steps = step_counter(opt)
    for step in range(9):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, step)
        assert loss.dtype == torch.float32  # mse in float32, matmuls in bf16
        loss.backward()
        opt.step()
    assert len(steps) == 9 and opt.trajectory_step == 0
    for got, want in zip(final_phi(opt), expected):
        # float32; the outer kernel rounds phi + eta(theta - phi) differently from line 10
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_grad_scaler_skipped_steps_are_not_inner_steps() -> None:
    """Steps with inf gradients are skipped by the scaler and do not advance the trajectory:
    the result equals a run that never saw those batches."""
    poisoned = {2, 6}
    model = float_model()
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.05), INNER_STEPS, OUTER_LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    steps = step_counter(opt)
    scales = []
    for step in range(11):
        opt.zero_grad()
        loss = loss_of(model, step)
        if step in poisoned:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert len(steps) == 9  # 11 calls, 2 skipped
    assert opt.trajectory_step == 0  # 9 = 3 full trajectories
    assert scales[2] < scales[1] and scales[6] < scales[5]  # the scaler did back off
    clean = [s for s in range(11) if s not in poisoned]
    expected = reference(float_model(), clean, autocast=False)
    for got, want in zip(final_phi(opt), expected):
        # powers-of-two scales leave the unscaled gradients bit-identical; the tolerance
        # is the outer kernel's float32 rounding (see above)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_grad_scaler_with_autocast_runs_and_tracks_params() -> None:
    model = float_model()
    opt = SeqReptile(torch.optim.AdamW(model.parameters(), lr=1e-2), INNER_STEPS, OUTER_LR)
    scaler = torch.amp.GradScaler("cpu")
    steps = step_counter(opt)
    for step in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, step)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # acts on the shared param_groups
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    assert len(steps) == 6 and opt.trajectory_step == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (
        len(slow_by_index(opt)) == sum(1 for p in model.parameters()) - 1
    )  # `unused` never tracked


def test_accelerate_bf16_with_gradient_accumulation() -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    model = float_model()
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.05), INNER_STEPS, OUTER_LR)
    steps = step_counter(opt)
    # A Trainer test earlier in the process may have fixed accelerate's global state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        accelerator = accelerate.Accelerator(
            cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2
        )
        prepared_model, prepared_opt = accelerator.prepare(model, opt)
        for micro in range(12):
            with accelerator.accumulate(prepared_model):
                x, y, task = batch(micro // 2)  # both micro-batches of a step: one task
                loss = (prepared_model(x.float(), task) - y.float()).pow(2).mean()
                accelerator.backward(loss)
                prepared_opt.step()
                prepared_opt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert len(steps) == 6  # only synchronising micro-steps are inner steps
    assert opt.trajectory_step == 0
    # reference: same accumulation by hand under the same autocast
    ref_model = float_model()
    params = list(ref_model.parameters())
    inner = torch.optim.SGD(params, lr=0.05)
    phi = [p.detach().clone() for p in params]
    for step in range(6):
        inner.zero_grad()
        for _ in range(2):
            x, y, task = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (ref_model(x.float(), task) - y.float()).pow(2).mean()
            (loss / 2).backward()
        inner.step()
        if (step + 1) % INNER_STEPS == 0:
            with torch.no_grad():
                for p, slow in zip(params, phi):
                    slow -= OUTER_LR * (slow - p)
                    p.copy_(slow)
    for got, want in zip(final_phi(opt), phi):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
