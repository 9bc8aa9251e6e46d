"""The ``torch.optim.Optimizer`` contract, for every optimizer of the package that wraps another.

Modelled on PyTorch's generic optimizer tests (``TestOptimRenewed`` in ``test/test_optim.py``;
``benchmarks/torch_optim_contract.py`` runs those themselves): closure, deepcopy and pickle,
hooks, state-dict round trips and refused loads, schedulers, ``GradScaler``,
``add_param_group``, ``repr``. Parametrised over SeqReptile, Reptile and the surgery
optimizers wherever the contract applies to them.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from tests.helpers import TwoHeadNet, loss_at, make_model
from torch_seqreptile import RecAdam, Reptile, SeqReptile, surgery
from torch_seqreptile._wrapper import OptimizerWrapper

NUM_TASKS = 2
Factory = Callable[[TwoHeadNet], OptimizerWrapper]


def groups(model: TwoHeadNet) -> list[dict[str, Any]]:
    return [
        {"params": list(model.trunk.parameters())},
        {"params": list(model.heads.parameters()), "lr": 0.02},
    ]


META: dict[str, Factory] = {
    "seqreptile": lambda m: SeqReptile(
        torch.optim.AdamW(groups(m), lr=0.05), 3, 0.5, outer_momentum=0.3, nesterov=True
    ),
    "reptile": lambda m: Reptile(
        torch.optim.SGD(groups(m), lr=0.05, momentum=0.5), 2, 0.5, num_tasks=NUM_TASKS
    ),
}
SURGERY: dict[str, Factory] = {
    "mtl": lambda m: surgery.MTL(torch.optim.Adam(groups(m), lr=0.05)),
    "pcgrad": lambda m: surgery.PCGrad(torch.optim.Adam(groups(m), lr=0.05), seed=1),
    "gradvac": lambda m: surgery.GradVac(torch.optim.Adam(groups(m), lr=0.05), layers=m, seed=1),
    "gradnorm": lambda m: surgery.GradNorm(torch.optim.Adam(groups(m), lr=0.05), NUM_TASKS),
    "cagrad": lambda m: surgery.CAGrad(torch.optim.Adam(groups(m), lr=0.05)),
    "mgda": lambda m: surgery.MGDA(torch.optim.Adam(groups(m), lr=0.05)),
}
ALL = {**META, **SURGERY}


def model() -> TwoHeadNet:
    return make_model(seed=4, num_tasks=NUM_TASKS)


def task_of(opt: OptimizerWrapper, step: int) -> int:
    return opt.current_task if isinstance(opt, Reptile) else step % NUM_TASKS


def backward(net: TwoHeadNet, opt: OptimizerWrapper, step: int) -> Tensor:
    """One step's gradients: one task's loss (meta-optimizers) or all tasks' (surgery)."""
    if isinstance(opt, surgery.GradientCombiner):
        losses = [loss_at(net, step, task) for task in range(NUM_TASKS)]
        opt.backward(losses)
        return torch.stack(losses).sum().detach()
    loss = loss_at(net, step, task_of(opt, step))
    loss.backward()
    return loss.detach()


def train(net: TwoHeadNet, opt: OptimizerWrapper, steps: range, closure: bool = False) -> None:
    for step in steps:
        if closure:

            def evaluate(step: int = step) -> Tensor:
                opt.zero_grad()
                return backward(net, opt, step)

            opt.step(evaluate)
        else:
            opt.zero_grad()
            backward(net, opt, step)
            opt.step()


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys(), b)
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def assert_same_run(
    a: tuple[TwoHeadNet, OptimizerWrapper], b: tuple[TwoHeadNet, OptimizerWrapper]
) -> None:
    assert_same(a[0].state_dict(), b[0].state_dict(), "model")
    assert_same(a[1].state_dict(), b[1].state_dict(), "optimizer")


# ---------------------------------------------------------------- step(closure)
@pytest.mark.parametrize("name", ALL)
def test_closure_equals_the_plain_path(name: str) -> None:
    runs = []
    for closure in (False, True):
        net = model()
        opt = ALL[name](net)
        train(net, opt, range(7), closure=closure)
        runs.append((net, opt))
    assert_same_run(*runs)


def test_lbfgs_inner_optimizer_with_outer_lr_one_is_plain_lbfgs() -> None:
    def run(wrap: bool) -> TwoHeadNet:
        net = model()
        inner = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4)
        opt: torch.optim.Optimizer = SeqReptile(inner, 2, 1.0) if wrap else inner
        for step in range(5):

            def closure(step: int = step) -> Tensor:
                opt.zero_grad()
                loss = loss_at(net, step, step % NUM_TASKS)
                loss.backward()
                return loss

            opt.step(closure)
        return net

    assert_same(run(True).state_dict(), run(False).state_dict())
    net = model()
    opt = SeqReptile(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4), 2, 0.5)
    train(net, opt, range(5), closure=True)
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert opt.trajectory_step == 1


@pytest.mark.parametrize("name", META)
def test_reject_nonfinite_sees_the_gradients_the_closure_computes(name: str) -> None:
    net = model()
    opt = ALL[name](net)
    opt.reject_nonfinite = True  # type: ignore[attr-defined]
    train(net, opt, range(2))
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))

    def poisoned() -> Tensor:
        opt.zero_grad()
        loss = loss_at(net, 5, task_of(opt, 5)) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="not finite"):
        opt.step(poisoned)
    assert_same(before, (net.state_dict(), opt.state_dict()))


# ---------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ALL)
def test_copies_continue_identically(name: str, how: str) -> None:
    net = model()
    opt = ALL[name](net)
    opt.register_step_post_hook(lambda *_: None)  # hooks are not copied, as in torch
    # a scheduler patches opt.step with a wrapper bound to this very optimizer
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    train(net, opt, range(4))
    if how == "deepcopy":
        copied = copy.deepcopy((net, opt))
    else:
        copied = pickle.loads(pickle.dumps((net, opt)))
    assert copied[1].param_groups[0]["params"][0] is next(copied[0].trunk.parameters())
    assert not copied[1]._optimizer_step_post_hooks
    train(net, opt, range(4, 9))
    train(*copied, range(4, 9))
    assert_same_run((net, opt), copied)
    assert scheduler.optimizer is opt


# ---------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", ALL)
def test_every_hook_fires_once(name: str) -> None:
    net = model()
    opt = ALL[name](net)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))

    def seen(kind: str) -> Any:  # global hooks see every optimizer that steps: which one
        return lambda o, *_: calls.append(kind if o is opt else f"{kind} {type(o).__name__}")

    handles = [
        register_optimizer_step_pre_hook(seen("gpre")),
        register_optimizer_step_post_hook(seen("gpost")),
    ]
    try:
        train(net, opt, range(3))
    finally:
        for handle in handles:
            handle.remove()
    # the inner optimizer's step is part of the wrapper's: its global hooks do not fire again;
    # GradNorm's task weights have an optimizer of their own, a public one, stepped once
    weights = ["gpre Adam", "gpost Adam"] if name == "gradnorm" else []
    assert calls == ["gpre", "pre", *weights, "post", "gpost"] * 3

    def mark(_: Any, state: dict[str, Any]) -> dict[str, Any]:
        calls.append("sd_post")
        return {**state, "marked": True}

    calls.clear()
    opt.register_state_dict_pre_hook(lambda _: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(mark)
    state = opt.state_dict()
    assert calls == ["sd_pre", "sd_post"] and state["marked"]

    def unmark(_: Any, state: dict[str, Any]) -> dict[str, Any]:
        calls.append("load_pre")
        return {k: v for k, v in state.items() if k != "marked"}

    calls.clear()
    opt.register_load_state_dict_pre_hook(unmark)
    opt.register_load_state_dict_post_hook(lambda _: calls.append("load_post"))
    opt.load_state_dict(state)
    assert calls == ["load_pre", "load_post"]


# ---------------------------------------------------------------- state dicts
@pytest.mark.parametrize("name", ALL)
def test_state_dict_has_torch_layout_and_loads_weights_only(name: str) -> None:
    net = model()
    opt = ALL[name](net)
    train(net, opt, range(5))
    state = opt.state_dict()
    assert isinstance(state["state"], dict) and isinstance(state["param_groups"], list)
    assert all(isinstance(i, int) for i in state["state"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh_net = model()
    fresh_net.load_state_dict(net.state_dict())
    fresh = ALL[name](fresh_net)
    fresh.load_state_dict(loaded)
    assert_same(fresh.state_dict(), state)
    train(net, opt, range(5, 10))
    train(fresh_net, fresh, range(5, 10))
    assert_same_run((net, opt), (fresh_net, fresh))


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(state: dict[str, Any]) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return tamper


def _first_entry(state: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = state["state"][min(state["state"])]
    return entry


COMMON_TAMPERS: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("no state", _set(("state",), KeyError), ValueError, r"state_dict\['state'\] must be a dict"),
    ("group count", lambda s: s["param_groups"].pop(), ValueError, "parameter groups"),
    ("param count", lambda s: s["param_groups"][0]["params"].pop(), ValueError, "must list"),
    ("unknown id", lambda s: s["state"].__setitem__(99, {}), ValueError, "no param group lists"),
    ("old format", lambda s: s.update(wrapper="SeqReptile", inner={}), ValueError, "0.1 format"),
]
META_TAMPERS = [
    *COMMON_TAMPERS,
    ("K zero", _set(("param_groups", 0, "inner_steps"), 0), ValueError, "inner_steps"),
    ("K str", _set(("param_groups", 1, "inner_steps"), "3"), TypeError, "inner_steps"),
    ("eta big", _set(("param_groups", 0, "outer_lr"), 7.0), ValueError, "outer_lr"),
    ("eta nan", _set(("param_groups", 0, "outer_lr"), float("nan")), ValueError, "outer_lr"),
    ("momentum", _set(("param_groups", 1, "outer_momentum"), 1.0), ValueError, "outer_momentum"),
    ("nesterov", _set(("param_groups", 0, "outer_nesterov"), "yes"), TypeError, "outer_nesterov"),
    ("no eta", _set(("param_groups", 0, "outer_lr"), KeyError), ValueError, "lacks"),
    ("counter", _set(("param_groups", 0, "trajectory_step"), -1), ValueError, "trajectory_step"),
    ("counter f", _set(("param_groups", 1, "trajectory_step"), 1.5), TypeError, "trajectory_step"),
    (
        "slow shape",
        lambda s: _first_entry(s).__setitem__("slow_weight", torch.zeros(2)),
        ValueError,
        "shape",
    ),
    (
        "slow list",
        lambda s: _first_entry(s).__setitem__("slow_weight", [0.0]),
        ValueError,
        "floating-point tensor",
    ),
    (
        "slow int",
        lambda s: _first_entry(s).__setitem__("slow_weight", _first_entry(s)["slow_weight"].long()),
        ValueError,
        "floating-point tensor",
    ),
    ("entry", lambda s: s["state"].__setitem__(min(s["state"]), 3), ValueError, "must be a dict"),
    (
        "str id",  # what a JSON round trip makes of the keys
        lambda s: s["state"].__setitem__("0", s["state"].pop(min(s["state"]))),
        ValueError,
        "not a parameter id",
    ),
]
REPTILE_TAMPERS = [
    *META_TAMPERS,
    ("no sum", lambda s: _first_entry(s).pop("endpoint_sum"), ValueError, "endpoint_sum"),
    ("T", _set(("param_groups", 0, "num_tasks"), 0), ValueError, "num_tasks"),
    ("index", _set(("param_groups", 0, "trajectory_index"), 5), ValueError, "trajectory_index"),
    ("ranks", _set(("param_groups", 0, "process_group_size"), 2), ValueError, "parallel rank"),
    ("schedule", _set(("param_groups", 1, "inner_steps"), 5), ValueError, "one schedule"),
]
SEQREPTILE_TAMPERS = [
    *META_TAMPERS,
    (
        "foreign",
        lambda s: _first_entry(s).__setitem__("endpoint_sum", torch.zeros(1)),
        ValueError,
        "another meta-optimizer",
    ),
]
SURGERY_TAMPERS = [
    *COMMON_TAMPERS,
    ("no surgery", _set(("surgery",), KeyError), ValueError, r"state_dict\['surgery'\]"),
    ("method", _set(("surgery", "method"), "MGDA"), ValueError, "saved by 'MGDA'"),
    ("tasks", _set(("surgery", "num_tasks"), 3), ValueError, "num_tasks"),
]
CASES = [
    *[("seqreptile", *t) for t in SEQREPTILE_TAMPERS],
    *[("reptile", *t) for t in REPTILE_TAMPERS],
    *[("pcgrad", *t) for t in SURGERY_TAMPERS],
    *[("gradnorm", *t) for t in SURGERY_TAMPERS],
]


@pytest.mark.parametrize(
    "name, label, tamper, error, match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_refused_load_leaves_everything_unchanged(
    name: str,
    label: str,
    tamper: Callable[[dict[str, Any]], None],
    error: type[Exception],
    match: str,
) -> None:
    net = model()
    opt = ALL[name](net)
    train(net, opt, range(5))
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    donor_net = model()
    donor = ALL[name](donor_net)
    train(donor_net, donor, range(3))
    state = copy.deepcopy(donor.state_dict())
    tamper(state)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    assert_same(before, (net.state_dict(), opt.state_dict()))
    train(net, opt, range(5, 7))  # still usable


# ---------------------------------------------------------------- schedulers, scaler
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "linear": lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=5),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        ],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", ALL)
def test_lr_schedulers_act_on_the_inner_learning_rate(name: str, scheduler: str) -> None:
    net = model()
    opt = ALL[name](net)
    plain = ALL[name](model()).optimizer  # the same inner optimizer, unwrapped
    schedules = [SCHEDULERS[scheduler](o) for o in (opt, plain)]
    lrs: list[list[list[float]]] = [[], []]
    for step in range(6):
        opt.zero_grad()
        loss = backward(net, opt, step)
        opt.step()
        for i, (o, s) in enumerate(zip((opt, plain), schedules)):
            s.step(float(loss)) if scheduler == "plateau" else s.step()
            lrs[i].append([g["lr"] for g in o.param_groups])
    assert lrs[0] == lrs[1]
    assert lrs[0][0] != lrs[0][-1]
    resumed = SCHEDULERS[scheduler](ALL[name](model()))
    resumed.load_state_dict(schedules[0].state_dict())


@pytest.mark.parametrize("name", META)
def test_grad_scaler_gives_the_unscaled_result(name: str) -> None:
    runs = []
    for scaled in (False, True):
        net = model()
        opt = ALL[name](net)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=scaled)
        for step in range(7):
            opt.zero_grad()
            scaler.scale(loss_at(net, step, task_of(opt, step))).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((net, opt))
    assert_same_run(*runs)


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    runs = []
    for compiled in (False, True):
        net = model()
        # SGD: compiled Adam itself differs from eager Adam by ~1e-6 in float64
        inner = torch.optim.SGD(groups(net), lr=0.05, momentum=0.5)
        opt = SeqReptile(inner, 3, 0.5, outer_momentum=0.3, nesterov=True)

        def train_step(step: int, net: TwoHeadNet = net, opt: OptimizerWrapper = opt) -> None:
            opt.zero_grad()
            loss_at(net, step, step % NUM_TASKS).backward()
            opt.step()

        run = torch.compile(train_step) if compiled else train_step
        for step in range(7):
            run(step)
        runs.append((net, opt))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert runs[1][1].trajectory_step == 1


# ---------------------------------------------------------------- groups, repr
@pytest.mark.parametrize("name", META)
def test_add_param_group_fills_defaults_and_refuses_bad_values(name: str) -> None:
    net = model()
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ALL[name](net)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['outer_lr'\]"):
        opt.add_param_group({"params": [extra], "outer_lr": 2.0})
    assert [dict(g) for g in opt.param_groups] == before
    opt.add_param_group({"params": [extra], "lr": 0.1})
    added = opt.param_groups[-1]
    assert added["outer_lr"] == 0.5 and added["trajectory_step"] == 0 and added["lr"] == 0.1
    with pytest.raises(ValueError, match="hyperparameter"):
        SeqReptile(opt, 2, 0.5)  # its groups already hold outer_lr: wrapping twice is refused


def test_repr_shows_the_outer_hyperparameters() -> None:
    text = repr(ALL["seqreptile"](model()))
    assert text.startswith("SeqReptile(AdamW) (")
    assert "inner_steps: 3" in text and "outer_lr: 0.5" in text and "lr: 0.02" in text


def test_outer_update_happens_when_inner_steps_is_lowered_mid_trajectory() -> None:
    net = model()
    opt = SeqReptile(torch.optim.SGD(net.parameters(), lr=0.1), 5, 0.5)
    train(net, opt, range(3))
    opt.param_groups[0]["inner_steps"] = 2  # the trajectory is already 3 steps long
    train(net, opt, range(3, 4))
    assert opt.trajectory_step == 0


def test_reset_inner_state_keeps_recadam_anchors() -> None:
    net = model()
    anchors = [p.detach().clone() for p in net.parameters()]
    opt = SeqReptile(RecAdam(net.parameters(), lr=1e-3, gamma=1.0), 2, 0.5, reset_inner_state=True)
    train(net, opt, range(5))
    inner = opt.optimizer.state
    for p, anchor in zip(net.parameters(), anchors):
        assert torch.equal(inner[p]["pretrained"], anchor)
    assert {int(inner[p]["step"]) for p in net.trunk.parameters()} == {1}


def test_reptile_round_without_any_gradient_is_a_no_op() -> None:
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = Reptile(torch.optim.SGD([param], lr=0.1), 1, 0.5, num_tasks=2)
    for _ in range(3):  # a round ends with no tracked parameter
        opt.step()
    opt.outer_step()
    assert torch.equal(param.detach(), torch.ones(2, dtype=torch.float64))
    assert opt.trajectory_index == 0 and len(opt.state) == 0


@pytest.mark.parametrize("name", META)
def test_state_is_a_live_view_that_keeps_tracking_consistent(name: str) -> None:
    net = model()
    opt = ALL[name](net)
    train(net, opt, range(2))
    for entry in opt.state.values():  # torch's "move the state to a device" loop
        for key, value in entry.items():
            if isinstance(value, Tensor):
                entry[key] = value.clone()
    assert_same(opt.state_dict(), copy.deepcopy(opt.state_dict()))
    weight = next(net.trunk.parameters())
    del opt.state[weight]  # forgets phi and the inner moments of this parameter
    assert weight not in opt.state and weight not in opt.optimizer.state
    train(net, opt, range(2, 3))
    assert "slow_weight" in opt.state[weight]  # tracked again at its next gradient


def test_reptile_groups_must_share_one_schedule_when_added() -> None:
    net = model()
    opt = ALL["reptile"](net)
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one schedule"):
        opt.add_param_group({"params": [extra], "inner_steps": 5})
    assert len(opt.param_groups) == 2


def test_add_param_group_reads_the_edited_defaults() -> None:
    net = model()
    opt = ALL["seqreptile"](net)
    opt.defaults["outer_lr"] = 0.9
    opt.defaults["lr"] = 0.7
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert (opt.param_groups[-1]["outer_lr"], opt.param_groups[-1]["lr"]) == (0.9, 0.7)
