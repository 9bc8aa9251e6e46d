"""Every surgery method under ``torch.amp.GradScaler``: the same training as without it, and
overflowing steps skipped (with ``error_if_nonfinite=False``) without touching the method."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_model
from tests.test_surgery import METHODS, build

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def steps(model, opt, scaler: torch.amp.GradScaler | None, skip_first: bool = False) -> None:
    """STEPS training steps, through the scaler if one is given (the step-0 batch skipped
    with ``skip_first``: the reference of a run whose first step overflowed)."""
    for step in range(STEPS):
        if skip_first and step == 0:
            continue
        losses = task_losses_float(model, step)
        opt.zero_grad()
        if scaler is None:
            opt.backward(losses)
            opt.step()
        else:
            opt.backward([scaler.scale(loss) for loss in losses])
            scaler.step(opt)
            scaler.update()


def train(scaler: torch.amp.GradScaler | None, name: str, skip_first: bool = False):
    model = make_model(3).float()
    opt = build(
        name,
        torch.optim.Adam(model.parameters(), lr=0.01),
        model=model,
        error_if_nonfinite=False,
    )
    steps(model, opt, scaler, skip_first)
    return model, opt


def task_losses_float(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 5, generator=gen)
    return [(model(x, t) - torch.randn(6, generator=gen) - t).pow(2).mean() for t in range(3)]


def method_state(opt) -> dict[str, torch.Tensor]:
    """The method's tensors; GradNorm's L_i(0) normalised, as it holds the *scaled* losses
    (only the ratios L_i / L_i(0) over their mean enter GradNorm, so a scale cancels)."""
    state = opt.state_dict()["surgery"]["method_state"]
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "initial_losses" in out:
        out["initial_losses"] = out["initial_losses"] / out["initial_losses"].sum()
    return out


@pytest.mark.parametrize("name", METHODS)
def test_grad_scaler_gives_the_unscaled_training(name: str) -> None:
    plain_model, plain = train(None, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled_model, scaled = train(scaler, name)
    assert scaler.get_scale() == 2.0**16  # no overflow: every step was taken
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key, value in method_state(plain).items():
        torch.testing.assert_close(method_state(scaled)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_overflowing_step_is_skipped_and_leaves_the_method_alone(name: str) -> None:
    # 2**127 makes the first step's scaled gradients overflow float32; the scaler then
    # divides its scale by 2**100 and every later step is finite
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    scaled_model, scaled = train(scaler, name)
    assert scaler.get_scale() == 2.0**27  # exactly one step overflowed and was skipped
    reference_model, reference = train(None, name, skip_first=True)
    for p, q in zip(scaled_model.parameters(), reference_model.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key, value in method_state(reference).items():
        torch.testing.assert_close(method_state(scaled)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "mtl"])
def test_overflow_raises_by_default_with_a_hint(name: str) -> None:
    model = make_model(3).float()
    opt = build(name, torch.optim.Adam(model.parameters(), lr=0.01), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    losses = task_losses_float(model, 0)
    with pytest.raises(ValueError, match="error_if_nonfinite=False"):
        opt.backward([scaler.scale(loss) for loss in losses])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("weights", ["adam", "sgd"])
def test_gradnorm_weights_ignore_a_changing_loss_scale(weights: str) -> None:
    """The reported failure: the weights' gradient came from the *scaled* norms (the scaler
    unscales only param_groups), so an SGD weight optimizer, or any with a growing scale,
    trained other weights than without the scaler."""
    from torch_seqreptile.surgery import GradNorm

    def run(scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        model = make_model(3).float()
        kwargs = (
            {} if weights == "adam" else {"weight_optimizer": lambda w: torch.optim.SGD(w, lr=0.1)}
        )
        opt = GradNorm(torch.optim.SGD(model.parameters(), lr=0.05), 3, 1.5, **kwargs)
        steps(model, opt, scaler)
        return opt.loss_weights.detach()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)  # x2 a step
    scaled = run(scaler)
    assert scaler.get_scale() == 2.0 ** (4 + STEPS)
    torch.testing.assert_close(scaled, run(None), rtol=1e-6, atol=1e-7)
