"""Degenerate input real training produces (zero and negative losses, zero task gradients,
parameter groups added mid-run) and the methods' explicit, schedulable state."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import make_model
from tests.test_surgery import task_losses
from torch_seqreptile import RecAdam
from torch_seqreptile.surgery import MGDA, MTL, GradNorm, GradVac


def gradnorm(model: nn.Module, **kw) -> GradNorm:
    return GradNorm(torch.optim.SGD(model.parameters(), lr=0.05), 3, alpha=0.5, **kw)


def shifted(losses: list[torch.Tensor], values: list[float]) -> list[torch.Tensor]:
    """The same graphs, loss values moved to ``values`` (gradients unchanged)."""
    return [loss - loss.detach() + v for loss, v in zip(losses, values)]


# ---------------------------------------------------------------- GradNorm
def test_gradnorm_all_zero_losses_skip_the_weight_update() -> None:
    model = make_model(0)
    opt = gradnorm(model)
    for step in range(2):
        opt.zero_grad()
        opt.backward(task_losses(model, step))
        opt.step()
    before = opt.loss_weights.detach().clone()
    opt.zero_grad()
    opt.backward(shifted(task_losses(model, 2), [0.0, 0.0, 0.0]))
    assert opt.loss_weights.grad is None
    opt.step()
    assert torch.equal(opt.loss_weights.detach(), before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.5])
def test_gradnorm_one_zero_loss_gives_finite_weights(alpha: float) -> None:
    model = make_model(0)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=0.05), 3, alpha=alpha)
    opt.backward(task_losses(model, 0))
    opt.step()
    opt.zero_grad()
    opt.backward(shifted(task_losses(model, 1), [0.0, 0.7, 1.2]))  # task 0 solved
    assert torch.isfinite(opt.loss_weights.grad).all()
    opt.step()
    weights = opt.loss_weights.detach()
    assert torch.isfinite(weights).all() and math.isclose(float(weights.sum()), 3.0)


def test_gradnorm_negative_loss_raises_and_changes_nothing() -> None:
    model = make_model(0)
    opt = gradnorm(model)
    opt.backward(task_losses(model, 0))
    opt.step()
    opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"losses >= 0.*losses\[1\] = -0.5"):
        opt.backward(shifted(task_losses(model, 1), [1.0, -0.5, 1.0]))
    assert all(p.grad is None for p in model.parameters())
    after = opt.state_dict()["surgery"]["method_state"]
    assert torch.equal(after["loss_weights"], state["surgery"]["method_state"]["loss_weights"])


def test_gradnorm_zero_first_loss_raises() -> None:
    model = make_model(0)
    opt = gradnorm(model)
    with pytest.raises(ValueError, match="positive initial losses"):
        opt.backward(shifted(task_losses(model, 0), [1.0, 0.0, 1.0]))
    assert opt.initial_losses is None


def test_gradnorm_task_with_zero_gradient_trains_on() -> None:
    """A task whose gradient is exactly zero (it reaches the layer, its loss is flat there):
    it used to raise mid-training; its weight gradient is 0 and the others train on."""
    model = make_model(0)
    opt = gradnorm(model)
    for step in range(3):
        losses = task_losses(model, step)
        flat = 0.0 * losses[2] + 1.0  # same graph, zero gradient everywhere, loss 1
        opt.zero_grad()
        opt.backward([losses[0], losses[1], flat])
        if step > 0:
            assert float(opt.loss_weights.grad[2]) == 0.0
            assert torch.isfinite(opt.loss_weights.grad).all()
        opt.step()
    assert torch.isfinite(opt.loss_weights).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradnorm_weight_optimizer_is_explicit_schedulable_and_saved() -> None:
    model = make_model(0)
    opt = gradnorm(model, weight_optimizer=lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9))
    assert isinstance(opt.weight_optimizer, torch.optim.SGD)
    assert opt.weight_optimizer.param_groups[0]["params"][0] is opt.loss_weights
    sched = torch.optim.lr_scheduler.StepLR(opt.weight_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        for step in range(3):
            opt.zero_grad()
            opt.backward(task_losses(model, step))
            opt.step()
            sched.step()
    assert opt.weight_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    saved = opt.state_dict()["surgery"]["method_state"]["weight_optimizer"]
    assert saved["state"][0]["momentum_buffer"].shape == (3,)

    twin_model = make_model(0)
    twin = gradnorm(twin_model, weight_optimizer=lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9))
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load aliases tensors
    for o, m in ((opt, model), (twin, twin_model)):
        o.zero_grad()
        o.backward(task_losses(m, 5))
        o.step()
    assert torch.equal(twin.loss_weights, opt.loss_weights)
    assert twin.weight_optimizer.param_groups[0]["lr"] == opt.weight_optimizer.param_groups[0]["lr"]


def test_gradnorm_weight_arguments_are_checked() -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match="weight_lr or weight_optimizer, not both"):
        gradnorm(model, weight_lr=0.1, weight_optimizer=lambda w: torch.optim.SGD(w, lr=0.1))
    with pytest.raises(TypeError, match=r"must return a torch\.optim\.Optimizer"):
        gradnorm(model, weight_optimizer=lambda w: None)


# ---------------------------------------------------------------- GradVac
def named_model() -> nn.Module:
    return make_model(0)


def test_gradvac_blocks_are_modules_by_default_from_parameter_names() -> None:
    model = named_model()
    opt = GradVac(torch.optim.SGD(model.named_parameters(), lr=0.1), seed=0)
    opt.backward(task_losses(model))
    assert opt.block_names == ["trunk.0", "trunk.2"]  # Linear weight + bias, per layer
    by_module = GradVac(torch.optim.SGD(model.parameters(), lr=0.1), layers=model, seed=0)
    by_module.backward(task_losses(model))
    assert by_module.block_names == opt.block_names
    torch.testing.assert_close(by_module.targets, opt.targets, rtol=0, atol=0)


def test_gradvac_without_names_or_layers_says_what_to_pass() -> None:
    model = named_model()
    with pytest.raises(ValueError, match="layers=model"):
        GradVac(torch.optim.SGD(model.parameters(), lr=0.1))


def test_gradvac_add_param_group_gets_new_blocks() -> None:
    """The reported IndexError: a group added after the first backward."""
    model = named_model()
    trunk = [(n, p) for n, p in model.named_parameters() if n.startswith("trunk")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("trunk")]
    opt = GradVac(torch.optim.SGD(trunk, lr=0.1), seed=0)
    opt.backward([loss for loss in task_losses(model)])
    first = opt.targets.clone()
    model.trunk.insert(3, nn.Linear(8, 8).double())  # a new shared layer
    opt.add_param_group(
        {"params": [(f"trunk.3.{n}", p) for n, p in model.trunk[3].named_parameters()]}
    )
    opt.add_param_group({"params": rest})
    opt.zero_grad()
    opt.backward(task_losses(model, 1))
    assert opt.block_names == ["trunk.0", "trunk.2", "trunk.3"]
    assert opt.targets.shape == (3, 3, 3)
    assert not torch.equal(opt.targets[:2], first)  # the old blocks moved on
    with pytest.raises(ValueError, match="no parameter names"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_gradvac_state_dict_keeps_block_names() -> None:
    model = named_model()
    opt = GradVac(torch.optim.SGD(model.named_parameters(), lr=0.1), seed=0)
    opt.backward(task_losses(model))
    twin = GradVac(torch.optim.SGD(named_model().named_parameters(), lr=0.1), seed=0)
    twin.load_state_dict(opt.state_dict())
    assert twin.block_names == opt.block_names and torch.equal(twin.targets, opt.targets)


# ---------------------------------------------------------------- RecAdam
def test_recadam_defaults_are_stable() -> None:
    """The reported failure: lr 1e-3 with gamma 5000 sat at theta* for 230 steps, then blew up."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = RecAdam(model.parameters())
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(600):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert all(float(p.abs().max()) < 10.0 for p in model.parameters())


@pytest.mark.parametrize(
    ("lr", "gamma", "k", "t0", "warns"),
    [
        (1e-3, 5000.0, 0.5, 250.0, True),  # the old defaults: 5
        (2e-5, 5000.0, 0.5, 250.0, False),
        (1e-3, 5000.0, 1.0, 0.0, False),  # lambda(1) = 0.73: 5 * 0.27 = 1.3
        (1e-3, 1500.0, 0.5, 250.0, False),
    ],
)
def test_recadam_warns_when_the_penalty_diverges(lr, gamma, k, t0, warns) -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = RecAdam(params, lr=lr, gamma=gamma, k=k, t0=t0)
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    diverging = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(diverging) == (2 if warns else 0)
    if warns:
        assert "param_groups[1]" in str(diverging[1].message)


def test_recadam_with_a_warned_setting_does_diverge() -> None:
    """The warning is not a false alarm: lr*gamma*(1-lambda) > 2 grows theta - theta*."""
    p = nn.Parameter(torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = RecAdam([p], lr=1e-3, gamma=5000.0, k=0.0, t0=0.0)  # lambda = 0.5: factor 2.5
    distances = []
    for _ in range(30):
        p.grad = torch.ones(1)
        opt.step()
        distances.append(abs(float(p)))
    assert distances[-1] > 100 * distances[5] and np.isfinite(distances[-1])


# ---------------------------------------------------------------- tampered method state
def tampered(opt, key: str, value) -> dict:
    state = copy.deepcopy(opt.state_dict())
    if value is None:
        del state["surgery"]["method_state"][key]
    else:
        state["surgery"]["method_state"][key] = value
    return state


@pytest.mark.parametrize(
    ("method", "key", "value", "match"),
    [
        ("gradvac", "beta", None, r"\['beta'\] must be a float"),
        ("gradvac", "beta", -3.0, r"\['beta'\] must be in \[0.0, 1.0\]"),
        ("gradvac", "targets", torch.zeros(1, 5, 5, dtype=torch.float64), r"\(blocks, 3, 3\)"),
        ("gradvac", "targets", torch.full((1, 3, 3), 2.0, dtype=torch.float64), "in \\[-1, 1\\]"),
        ("gradnorm", "alpha", float("nan"), r"\['alpha'\] must be in"),
        ("gradnorm", "loss_weights", torch.tensor([float("nan"), -1.0, 5.0]), "finite numbers"),
        ("gradnorm", "weight_optimizer", "adam", "an optimizer state_dict"),
    ],
)
def test_tampered_method_state_is_refused_before_anything_loads(method, key, value, match):
    model = make_model(0)
    inner = torch.optim.Adam(model.named_parameters(), lr=0.01)
    opt = GradVac(inner, 0.1, seed=0) if method == "gradvac" else GradNorm(inner, 3)
    opt.backward(task_losses(model))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = make_model(1)
    twin_inner = torch.optim.Adam(other.named_parameters(), lr=0.01)
    twin = GradVac(twin_inner, 0.1, seed=0) if method == "gradvac" else GradNorm(twin_inner, 3)
    before = copy.deepcopy(twin.state_dict())
    with pytest.raises((TypeError, ValueError), match=match):
        twin.load_state_dict(tampered(opt, key, value))
    assert twin.state_dict()["state"] == before["state"] == {}  # the inner state untouched
    twin.load_state_dict(saved)  # the untampered one loads


def test_gradnorm_weight_optimizer_state_of_another_shape_is_refused() -> None:
    model = make_model(0)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=0.05), 3)
    opt.backward(task_losses(model))
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    adam = state["surgery"]["method_state"]["weight_optimizer"]["state"][0]
    adam["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(5,\), expected \(3,\)"):
        opt.load_state_dict(state)


def test_gradnorm_layer_is_a_module_or_fixed_at_the_first_backward() -> None:
    model = make_model(0)
    by_module = GradNorm(torch.optim.SGD(model.parameters(), lr=0.05), 3, layer=model.trunk[2])
    by_tensors = GradNorm(
        torch.optim.SGD(model.parameters(), lr=0.05), 3, layer=list(model.trunk[2].parameters())
    )
    for opt in (by_module, by_tensors):
        opt.backward(task_losses(model))
    torch.testing.assert_close(by_module.loss_weights.grad, by_tensors.loss_weights.grad)
    default = GradNorm(torch.optim.SGD(model.trunk.parameters(), lr=0.05), 3)
    default.backward(task_losses(model))
    chosen = default.state_dict()["surgery"]["method_state"]["layer"]
    extra = nn.Linear(8, 8).double()  # a new shared parameter after the old last one
    default.add_param_group({"params": list(extra.parameters())})
    default.zero_grad()
    bump = extra(torch.ones(8, dtype=torch.float64)).pow(2).sum()  # >= 0: losses stay >= 0
    default.backward([loss + bump for loss in task_losses(model, 1)])
    assert default.state_dict()["surgery"]["method_state"]["layer"] == chosen  # not moved


def test_seed_is_refused_where_there_is_no_random_order() -> None:
    model = make_model(0)
    for method in (MGDA, MTL):  # CAGrad, GradNorm: no seed argument at all
        with pytest.raises(TypeError, match="seed is for PCGrad and GradVac"):
            method(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)


def test_mtl_last_weights_none_after_a_nonfinite_call() -> None:
    model = make_model(0)
    opt = MTL(torch.optim.SGD(model.parameters(), lr=0.1), error_if_nonfinite=False)
    losses = task_losses(model)
    opt.backward([losses[0] * math.inf, losses[1], losses[2]])
    assert opt.last_weights is None
