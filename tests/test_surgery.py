"""End-to-end tests of the surgery optimizers: literal float64 references, heads, errors,
LR schedulers, state_dict and fresh-process resume."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import make_model
from torch_seqreptile.surgery import (
    MGDA,
    MTL,
    CAGrad,
    GradNorm,
    GradVac,
    PCGrad,
    cagrad_weights,
    min_norm_weights,
)
from torch_seqreptile.surgery._base import random_orders

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mtl", "pcgrad", "gradvac", "gradnorm", "cagrad", "mgda"]


def build(name: str, optimizer: torch.optim.Optimizer, num_tasks: int = 3, model=None, **kw):
    common = {"error_if_nonfinite": kw.get("error_if_nonfinite", True)}
    if name == "mtl":
        return MTL(optimizer, num_tasks=num_tasks, **common)
    if name == "pcgrad":
        return PCGrad(optimizer, num_tasks=num_tasks, seed=kw.get("seed", 7), **common)
    if name == "gradvac":
        layers = "tensor" if model is None else model  # per module, as in the paper
        seed = kw.get("seed", 7)
        return GradVac(optimizer, 0.3, layers=layers, num_tasks=num_tasks, seed=seed, **common)
    if name == "gradnorm":
        return GradNorm(optimizer, num_tasks, alpha=0.5, weight_lr=0.05, **common)
    if name == "cagrad":
        return CAGrad(optimizer, 0.4, num_tasks=num_tasks, **common)
    return MGDA(optimizer, num_tasks=num_tasks, **common)


def task_losses(model, step: int = 0, num_tasks: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    return [
        (model(x, t) - torch.randn(6, generator=gen, dtype=torch.float64) - t).pow(2).mean()
        for t in range(num_tasks)
    ]


def per_task_flat(model, losses) -> tuple[list[torch.Tensor], torch.Tensor]:
    shared = list(model.trunk.parameters())
    flats = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    return shared, torch.stack(flats)


def trunk_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])


# ---------------------------------------------------------------- combined gradient vs literal
@pytest.mark.parametrize("name", METHODS)
def test_backward_matches_literal_combination_and_heads_get_own_gradient(name: str) -> None:
    model = make_model(0)
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    losses = task_losses(model)
    _, x = per_task_flat(model, losses)
    heads = [
        torch.autograd.grad(loss, list(model.heads[t].parameters()), retain_graph=True)
        for t, loss in enumerate(losses)
    ]
    gram = (x @ x.T).numpy()
    if name == "mtl":
        expected = x.sum(0)
    elif name == "pcgrad":
        from tests.test_surgery_properties import literal_pcgrad

        orders = random_orders(3, torch.Generator().manual_seed(7))
        expected = literal_pcgrad(list(x), orders)
    elif name == "gradvac":
        from tests.test_surgery_properties import literal_gradvac

        orders = random_orders(3, torch.Generator().manual_seed(7))
        sizes = [sum(p.numel() for p in m.parameters()) for m in model.trunk if len(m.state_dict())]
        edges = np.cumsum([0, *sizes])
        blocks = [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
        expected, _ = literal_gradvac(x, blocks, torch.zeros(len(blocks), 3, 3), 0.3, orders)
    elif name == "gradnorm":
        expected = x.sum(0)  # weights start at 1
    elif name == "cagrad":
        expected = torch.from_numpy(cagrad_weights(gram, 0.4)) @ x
    else:
        expected = torch.from_numpy(min_norm_weights(gram)) @ x
    opt.backward(losses)
    torch.testing.assert_close(trunk_grad(model), expected, rtol=1e-10, atol=1e-12)
    for t in range(3):
        for p, g in zip(model.heads[t].parameters(), heads[t]):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
    assert model.unused.grad is None


@pytest.mark.parametrize("name", METHODS)
def test_one_task_is_plain_training(name: str) -> None:
    model, reference = make_model(1, num_tasks=1), make_model(1, num_tasks=1)
    opt = build(name, torch.optim.Adam(model.parameters(), lr=0.01), num_tasks=1, model=model)
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    for step in range(3):
        opt.zero_grad()
        opt.backward(task_losses(model, step, 1))
        opt.step()
        plain.zero_grad()
        task_losses(reference, step, 1)[0].backward()
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_gradnorm_matches_literal_algorithm_1() -> None:
    """Chen et al. (2018), Alg. 1 with autograd (create_graph) on the chosen layer W, the
    weights' gradient divided by the mean task-gradient norm (documented, scale-free)."""
    alpha, weight_lr = 0.7, 0.05
    model, reference = make_model(2), make_model(2)
    layer = model.trunk[2].weight
    opt = GradNorm(
        torch.optim.SGD(model.parameters(), lr=0.05), 3, alpha, layer=layer, weight_lr=weight_lr
    )
    inner = torch.optim.SGD(reference.parameters(), lr=0.05)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=weight_lr)
    initial = None
    for step in range(4):
        losses = task_losses(reference, step)
        if initial is None:
            initial = torch.stack(losses).detach()
        W = reference.trunk[2].weight
        norms = torch.stack(
            [
                torch.autograd.grad(w[i] * losses[i], W, retain_graph=True, create_graph=True)[
                    0
                ].norm()
                for i in range(3)
            ]
        )
        rate = torch.stack(losses).detach() / initial
        target = (norms.mean() * (rate / rate.mean()) ** alpha).detach()
        l_grad = (norms - target).abs().sum()
        w_grad = torch.autograd.grad(l_grad, w, retain_graph=True)[0]
        inner.zero_grad()
        (w.detach() * torch.stack(losses)).sum().backward()
        inner.step()
        # the documented scale-free step: divided by the mean unweighted norm ||grad_W L_i||
        w_grad = w_grad / (norms.detach() / w.detach()).mean()
        w.grad = w_grad
        w_opt.step()
        with torch.no_grad():
            w.mul_(3 / w.sum())

        opt.zero_grad()
        opt.backward(task_losses(model, step))
        torch.testing.assert_close(opt.loss_weights.grad, w_grad, rtol=1e-10, atol=1e-12)
        opt.step()
        torch.testing.assert_close(opt.loss_weights.detach(), w.detach(), rtol=1e-12, atol=1e-14)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- torch.optim compatibility
@pytest.mark.parametrize("name", METHODS)
def test_is_an_optimizer_and_schedulers_act_on_inner_lr(name: str) -> None:
    model = make_model(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = build(name, inner, model=model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.backward(task_losses(model))
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_backward_adds_to_existing_grad() -> None:
    model = make_model(0)
    opt = PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), seed=1)
    opt.backward(task_losses(model))
    first = trunk_grad(model).clone()
    opt.generator.manual_seed(1)
    opt.backward(task_losses(model))
    torch.testing.assert_close(trunk_grad(model), 2 * first)


# ---------------------------------------------------------------- bad input
def snapshot(model, opt):
    return (
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        opt.state_dict(),
    )


def assert_unchanged(model, opt, before) -> None:
    grads, state = before
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after = opt.state_dict()
    assert after["surgery"]["method_state"].keys() == state["surgery"]["method_state"].keys()
    for key, value in state["surgery"]["method_state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after["surgery"]["method_state"][key]), key
    if state["surgery"]["rng_state"] is not None:
        assert torch.equal(state["surgery"]["rng_state"], after["surgery"]["rng_state"])


@pytest.mark.parametrize("name", METHODS)
def test_bad_losses_raise_and_change_nothing(name: str) -> None:
    model = make_model(0)
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.backward(task_losses(model, 0))  # state exists (EMA targets, L(0), ...)
    before = snapshot(model, opt)
    good = task_losses(model, 1)
    stray = nn.Parameter(torch.ones(2, dtype=torch.float64))
    cases = [
        (ValueError, "one loss per task", good[:2]),
        (ValueError, "one loss per task", []),
        (TypeError, "list or tuple", torch.stack(good)),
        (TypeError, r"losses\[1\] must be a torch.Tensor", [good[0], 1.0, good[2]]),
        (ValueError, r"losses\[2\] must be a scalar", [good[0], good[1], good[2] * torch.ones(2)]),
        (ValueError, r"losses must be finite.*losses\[1\]", [good[0], good[1] * math.inf, good[2]]),
        (ValueError, "must be finite", [good[0], good[1], good[2] * math.nan]),
        (ValueError, r"losses\[0\] does not require grad", [good[0].detach(), good[1], good[2]]),
    ]
    if name != "mtl":  # MTL is one backward of the sum, unchecked (see the MTL test below)
        cases.append((ValueError, r"losses\[1\] reaches none", [good[0], stray.sum(), good[2]]))
    for error, match, losses in cases:
        with pytest.raises(error, match=match):
            opt.backward(losses)
        assert_unchanged(model, opt, before)


def test_mtl_backward_is_backward_of_the_sum() -> None:
    """Exactly ``sum(losses).backward()``: same gradients, bit for bit, strays included."""
    model, reference = make_model(5), make_model(5)
    stray, stray_ref = (nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(2))
    opt = MTL(torch.optim.SGD(model.parameters(), lr=0.1))
    losses = task_losses(model, 2)
    opt.backward([losses[0], losses[1] + stray.sum(), losses[2]])
    ref = task_losses(reference, 2)
    (ref[0] + (ref[1] + stray_ref.sum()) + ref[2]).backward()
    for p, q in zip([*model.parameters(), stray], [*reference.parameters(), stray_ref]):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    assert torch.equal(opt.last_weights, torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", [m for m in METHODS if m != "mtl"])
def test_non_finite_gradient_raises_and_changes_nothing(name: str) -> None:
    model = make_model(0)
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.backward(task_losses(model, 0))
    before = snapshot(model, opt)
    losses = task_losses(model, 1)

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    losses[2] = InfGrad.apply(model.trunk[0].bias).sum() * 0 + task_losses(model, 1)[2]
    with pytest.raises(ValueError, match=r"gradient of losses\[2\] is not finite"):
        opt.backward(losses)
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize(
    "factory, error, match",
    [
        (lambda o: PCGrad(o, num_tasks=0), ValueError, "num_tasks must be an int >= 1"),
        (lambda o: PCGrad(o, seed=-1), ValueError, "seed must be an int >= 0"),
        (lambda o: PCGrad(o, seed=1.5), TypeError, "seed must be an int"),
        (lambda o: MTL(o, num_tasks=2.0), TypeError, "num_tasks must be an int"),
        (lambda o: CAGrad(o, c=-0.1), ValueError, r"c must be in \[0.0, inf\)"),
        (lambda o: CAGrad(o, c=math.nan), ValueError, "c must be in"),
        (lambda o: CAGrad(o, rescale=3), ValueError, r"rescale must be one of \(0, 1, 2\)"),
        (lambda o: GradVac(o, beta=1.5), ValueError, r"beta must be in \[0.0, 1.0\]"),
        (lambda o: GradVac(o, layers=[[torch.zeros(1)]]), ValueError, r"layers\[0\] holds"),
        (lambda o: GradNorm(o, 3, alpha=-1), ValueError, r"alpha must be in \[0.0, inf\)"),
        (lambda o: GradNorm(o, 3, weight_lr=0.0), ValueError, r"weight_lr must be in \(0, inf\)"),
        (lambda o: GradNorm(o, 3, layer=torch.zeros(2)), ValueError, "layer must be one or more"),
        (lambda o: GradNorm(o, 0), ValueError, "num_tasks must be an int >= 1"),
        (lambda o: MGDA("sgd"), TypeError, "optimizer must be a torch.optim.Optimizer"),
    ],
)
def test_invalid_hyperparameters(factory, error, match) -> None:
    model = make_model(0)
    with pytest.raises(error, match=match):
        factory(torch.optim.SGD(model.parameters(), lr=0.1))


def test_gradnorm_rejects_layer_not_reached_by_every_task() -> None:
    model = make_model(0)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=0.1), 3, layer=model.heads[0].weight)
    with pytest.raises(ValueError, match="layer must be reached"):
        opt.backward(task_losses(model))
    assert all(p.grad is None for p in model.parameters())
    assert opt.initial_losses is None


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("name", METHODS)
def test_state_dict_loads_weights_only_and_rejects_other_kind(name: str, tmp_path) -> None:
    model = make_model(0)
    opt = build(name, torch.optim.Adam(model.parameters(), lr=0.01), model=model)
    opt.backward(task_losses(model))
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = build(name, torch.optim.Adam(make_model(0).parameters(), lr=0.01))
    other.load_state_dict(state)
    wrong = build("mgda" if name != "mgda" else "mtl", torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="state_dict was saved by"):
        wrong.load_state_dict(state)


def test_pcgrad_seed_controls_the_order() -> None:
    def run(seed):
        model = make_model(3, num_tasks=3)
        opt = PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), seed=seed)
        weights = []
        for step in range(6):
            opt.zero_grad()
            opt.backward(task_losses(model, step))
            weights.append(opt.last_weights)
        return torch.stack(weights)

    assert torch.equal(run(5), run(5))


def _train(method: str, steps: int, out: str, stop_at: int | None, resume: str | None) -> None:
    torch.manual_seed(0)
    model = make_model(4)
    inner = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    opt = build(method, inner, model=model, seed=3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step = 0
    if resume:
        ckpt = torch.load(resume, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        step = ckpt["step"]
    while step < steps:
        if step == stop_at:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "step": step,
            }
            torch.save(state, out)
            return
        opt.zero_grad()
        opt.backward(task_losses(model, step))
        opt.step()
        sched.step()
        step += 1
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out)


def test_fresh_process_resume_is_bit_exact(tmp_path: Path) -> None:
    methods = ["pcgrad", "gradvac", "gradnorm", "cagrad"]

    def run(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "tests.test_surgery", *args], cwd=ROOT, check=True, timeout=120
        )

    run("full+stop", str(tmp_path), *methods)
    run("resume", str(tmp_path), *methods)
    for method in methods:
        full = torch.load(tmp_path / f"{method}-full.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"{method}-resumed.pt", weights_only=True)
        start = torch.load(tmp_path / f"{method}-ckpt.pt", weights_only=True)["model"]
        for key, tensor in full["model"].items():
            assert torch.equal(tensor, resumed["model"][key]), (method, key)
        assert any(not torch.equal(start[k], full["model"][k]) for k in start)
        for key, value in full["opt"]["surgery"]["method_state"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed["opt"]["surgery"]["method_state"][key]), key


if __name__ == "__main__":
    mode, folder, *names = sys.argv[1:]
    for method in names:
        base = f"{folder}/{method}"
        if mode == "full+stop":  # two runs from scratch in one process
            _train(method, 9, f"{base}-full.pt", None, None)
            _train(method, 9, f"{base}-ckpt.pt", 4, None)
        else:
            _train(method, 9, f"{base}-resumed.pt", None, f"{base}-ckpt.pt")
