"""SeqReptile against a literal float64 transcription of Algorithm 1."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    INNER_OPTIMIZERS,
    loss_at,
    make_inner,
    make_model,
    param_groups,
    reference_seqreptile,
    slow_by_index,
)
from torch_seqreptile import SeqReptile
from torch_seqreptile._interpolate import OUTER_IMPLS


def run_seqreptile(
    inner_name: str,
    num_steps: int,
    inner_steps: int,
    outer_lr: float,
    *,
    with_scheduler: bool = False,
    **options: object,
) -> tuple[torch.nn.Module, SeqReptile]:
    model = make_model()
    opt = SeqReptile(make_inner(inner_name, model), inner_steps, outer_lr, **options)  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 2, 0.7) if with_scheduler else None
    for step in range(num_steps):
        opt.zero_grad()
        loss_at(model, step).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model, opt


def run_reference(
    inner_name: str, num_steps: int, inner_steps: int, outer_lr: float, with_scheduler: bool = False
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = make_model()
    inner = make_inner(inner_name, model)
    scheduler = torch.optim.lr_scheduler.StepLR(inner, 2, 0.7) if with_scheduler else None
    phi = reference_seqreptile(model, inner, num_steps, inner_steps, outer_lr, scheduler)
    return model, phi


def assert_phi_equal(opt: SeqReptile, reference_phi: list[torch.Tensor], **tol: float) -> None:
    params = list(opt.params())
    for index, expected in enumerate(reference_phi):
        actual = slow_by_index(opt).get(
            index, params[index]
        )  # untracked parameters are still at phi
        torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("inner_name", sorted(INNER_OPTIMIZERS))
@pytest.mark.parametrize("seed", range(4))
def test_matches_algorithm_1(inner_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inner_steps = int(torch.randint(1, 6, (1,), generator=generator))
    outer_lr = float(torch.rand((), generator=generator, dtype=torch.float64))
    num_steps = int(torch.randint(inner_steps, 4 * inner_steps + 3, (1,), generator=generator))
    with_scheduler = seed % 2 == 0
    model, opt = run_seqreptile(
        inner_name, num_steps, inner_steps, outer_lr, with_scheduler=with_scheduler
    )
    ref_model, ref_phi = run_reference(inner_name, num_steps, inner_steps, outer_lr, with_scheduler)
    torch.testing.assert_close(model.state_dict(), ref_model.state_dict(), rtol=1e-12, atol=1e-12)
    assert_phi_equal(opt, ref_phi, rtol=1e-12, atol=1e-12)
    assert opt.trajectory_step == num_steps % inner_steps


@pytest.mark.parametrize("impl", OUTER_IMPLS)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.6, False), (0.6, True)])
def test_outer_paths_agree_with_reference(impl: str, momentum: float, nesterov: bool) -> None:
    if impl == "compiled":
        pytest.importorskip("torch._inductor")
    model, _opt = run_seqreptile(
        "adamw", 9, 3, 0.3, outer_impl=impl, outer_momentum=momentum, nesterov=nesterov
    )
    expected_model, _expected_opt = run_seqreptile(
        "adamw", 9, 3, 0.3, outer_impl="per_tensor", outer_momentum=momentum, nesterov=nesterov
    )
    torch.testing.assert_close(model.state_dict(), expected_model.state_dict())
    if momentum == 0.0:
        ref_model, _ = run_reference("adamw", 9, 3, 0.3)
        torch.testing.assert_close(model.state_dict(), ref_model.state_dict())


def test_outer_momentum_matches_heavy_ball_on_meta_gradient() -> None:
    """buf <- mu*buf + MG; phi <- phi - eta*(MG + mu*buf) (Nesterov) over three outer steps."""
    model = make_model()
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5, outer_momentum=0.9)
    params = list(model.parameters())
    phi = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(6):
        opt.zero_grad()
        loss_at(model, step).backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        if step % 2 == 1:
            for i, p in enumerate(params):
                theta = before[i] - 0.1 * p.grad if p.grad is not None else before[i]
                meta_gradient = phi[i] - theta
                buffers[i] = 0.9 * buffers[i] + meta_gradient
                phi[i] = phi[i] - 0.5 * buffers[i]
                torch.testing.assert_close(p.detach(), phi[i])


def test_outer_lr_one_is_plain_inner_training() -> None:
    model, _ = run_seqreptile("adamw", 11, 3, 1.0)
    plain = make_model()
    inner = make_inner("adamw", plain)
    for step in range(11):
        inner.zero_grad()
        loss_at(plain, step).backward()
        inner.step()
    torch.testing.assert_close(model.state_dict(), plain.state_dict(), rtol=0, atol=0)


def test_outer_lr_zero_never_moves_phi() -> None:
    initial = make_model().state_dict()
    model, opt = run_seqreptile("adam", 7, 3, 0.0)
    params = list(opt.params())
    for index, slow in slow_by_index(opt).items():
        name = next(n for n, p in model.named_parameters() if p is params[index])
        torch.testing.assert_close(slow, initial[name], rtol=0, atol=0)
    assert opt.trajectory_step == 1
    opt.outer_step()
    torch.testing.assert_close(model.state_dict(), initial, rtol=0, atol=0)


def test_param_groups_are_the_inner_list_and_state_is_split() -> None:
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = SeqReptile(inner, 2, 0.1)
    assert opt.param_groups is inner.param_groups
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=2)
    loss_at(model, 0).backward()
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.75e-3)
    # state[p] shows phi beside the inner entries; the inner optimizer sees only its own
    adam = {"step", "exp_avg", "exp_avg_sq"}
    assert len(inner.state) > 0 and set(opt.state) == set(inner.state)
    assert {frozenset(s) for s in opt.state.values()} == {frozenset({*adam, "slow_weight"})}
    assert {frozenset(s) for s in inner.state.values()} == {frozenset(adam)}
    # a live view: writes go to the key's owner, checked like a loaded state
    param = next(iter(inner.state))
    moved = opt.state[param]["slow_weight"].clone()
    opt.state[param]["slow_weight"] = moved
    assert opt.state[param]["slow_weight"] is moved and "slow_weight" not in inner.state[param]
    with pytest.raises(ValueError, match="shape"):
        opt.state[param]["slow_weight"] = torch.zeros(7, dtype=moved.dtype)
    with pytest.raises(TypeError, match="floating-point tensor"):
        opt.state[param]["slow_weight"] = None
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    inner.load_state_dict(inner.state_dict())  # rebinds the inner attributes
    assert opt.param_groups is inner.param_groups


def test_step_hooks_and_closure() -> None:
    model = make_model()
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_at(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"]
    assert isinstance(loss, torch.Tensor) and opt.trajectory_step == 1


def test_slow_weights_context_and_outer_step() -> None:
    model, opt = run_seqreptile("adamw", 5, 3, 0.25)
    fast = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(opt.params())
    with opt.slow_weights():
        for index, slow in slow_by_index(opt).items():
            torch.testing.assert_close(params[index].detach(), slow, rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), fast, rtol=0, atol=0)
    ref_model, ref_phi = run_reference("adamw", 5, 3, 0.25)
    opt.outer_step()  # ends the 2-step trajectory: phi <- phi - eta (phi - theta_2)
    ref_params = [p for group in param_groups(ref_model) for p in group["params"]]  # type: ignore[attr-defined]
    for p, slow in zip(ref_params, ref_phi):
        with torch.no_grad():
            slow -= 0.25 * (slow - p)
    assert_phi_equal(opt, ref_phi)
    for index, slow in slow_by_index(opt).items():
        torch.testing.assert_close(params[index].detach(), slow, rtol=0, atol=0)
    assert opt.trajectory_step == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.outer_step()  # nothing to end
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_reset_inner_state_clears_adam_moments_at_outer_steps() -> None:
    _, kept = run_seqreptile("adam", 6, 3, 0.5)
    _, reset = run_seqreptile("adam", 6, 3, 0.5, reset_inner_state=True)
    assert len(kept.optimizer.state) > 0 and len(reset.optimizer.state) == 0
    assert {frozenset(s) for s in reset.state.values()} == {frozenset({"slow_weight"})}
    _, reset = run_seqreptile("adam", 7, 3, 0.5, reset_inner_state=True)
    assert all(int(s["step"]) == 1 for s in reset.optimizer.state.values())


def test_slow_device_results_match_reference() -> None:
    """phi on an explicit device (CPU here; the cross-device path needs a GPU to exercise)."""
    model, opt = run_seqreptile("adamw", 8, 3, 0.4, slow_device="cpu")
    ref_model, ref_phi = run_reference("adamw", 8, 3, 0.4)
    assert all(s.device == torch.device("cpu") for s in slow_by_index(opt).values())
    torch.testing.assert_close(model.state_dict(), ref_model.state_dict())
    assert_phi_equal(opt, ref_phi)


def test_frozen_parameters_get_no_slow_copy() -> None:
    model = make_model()
    model.trunk[0].weight.requires_grad_(False)
    opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.1), 2, 0.5)
    loss_at(model, 0).backward()
    opt.step()
    params = list(opt.params())
    tracked = {params[i] for i in slow_by_index(opt)}
    assert model.trunk[0].weight not in tracked and model.unused not in tracked
    assert model.trunk[2].weight in tracked


def test_add_param_group_tracks_new_parameters() -> None:
    model = make_model()
    opt = SeqReptile(torch.optim.SGD(model.trunk.parameters(), lr=0.1), 2, 0.5)
    opt.add_param_group({"params": list(model.heads.parameters())})
    assert len(opt.optimizer.param_groups) == 2
    seen_grad = set()
    for step in range(5):
        opt.zero_grad()
        loss_at(model, step).backward()
        seen_grad |= {i for i, p in enumerate(opt.params()) if p.grad is not None}
        opt.step()
    assert set(slow_by_index(opt)) == seen_grad
    assert max(seen_grad) >= len(list(model.trunk.parameters()))
