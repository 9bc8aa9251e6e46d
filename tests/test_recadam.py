"""RecAdam against a literal float64 transcription of the authors' optimizer step."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_model
from torch_seqreptile import RecAdam
from torch_seqreptile.recadam import anneal_lambda


def literal_recadam(params, pretrained, grads_fn, steps, lr, betas, eps, wd, k, t0, gamma):
    """Chen et al. (2020), RecAdam.step of the authors' code, one tensor at a time."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        grads = grads_fn()
        for i, (p, pp, g) in enumerate(zip(params, pretrained, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            denom = v[i].sqrt() + eps
            step_size = lr * math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
            lam = 1 / (1 + math.exp(-k * (step - t0)))
            with torch.no_grad():
                p -= step_size * lam * m[i] / denom
                p -= lr * (1 - lam) * gamma * (p - pp)
                p -= lr * wd * p


def loss_of(model, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    return sum((model(x, t) - t).pow(2).mean() for t in range(3))


def test_matches_literal_authors_step() -> None:
    config = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, wd=0.05, k=0.3, t0=4.0, gamma=20.0)
    model, reference = make_model(0), make_model(0)
    pretrained = [p.detach().clone() for p in reference.parameters()]
    with torch.no_grad():  # start away from the pretrained point
        for p, q in zip(model.parameters(), reference.parameters()):
            p.add_(0.1)
            q.add_(0.1)
    opt = RecAdam(
        model.parameters(),
        config["lr"],
        config["betas"],
        config["eps"],
        config["wd"],
        k=config["k"],
        t0=config["t0"],
        gamma=config["gamma"],
        pretrained=pretrained,
    )
    params = [p for p in reference.parameters() if p is not reference.unused]
    anchors = [a for a, p in zip(pretrained, reference.parameters()) if p is not reference.unused]
    counter = iter(range(100))

    def grads_fn():
        return torch.autograd.grad(loss_of(reference, next(counter)), params)

    literal_recadam(params, anchors, grads_fn, 10, **config)
    for step in range(10):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_without_penalty_is_adam() -> None:
    model, reference = make_model(1), make_model(1)
    opt = RecAdam(model.parameters(), lr=0.01, eps=0.0, k=1e6, t0=0.0, gamma=0.0)
    adam = torch.optim.Adam(reference.parameters(), lr=0.01, eps=0.0)
    for step in range(5):
        for o, m in ((opt, model), (adam, reference)):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_annealing_schedule() -> None:
    assert anneal_lambda(10, 0.5, 10) == 0.5
    assert anneal_lambda(0, 1.0, 1000) == pytest.approx(0.0, abs=1e-300)
    assert anneal_lambda(5000, 1.0, 10) == 1.0
    assert anneal_lambda(3, 0.0, 100) == 0.5


def test_pull_toward_pretrained_when_lambda_is_zero() -> None:
    p = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = RecAdam([p], lr=0.1, k=1.0, t0=1e6, gamma=5.0, pretrained=[torch.tensor([1.0])])
    p.grad = torch.tensor([0.0], dtype=torch.float64)
    opt.step()  # lambda ~ 0: p <- p - lr * gamma * (p - p*) = 2 - 0.5
    torch.testing.assert_close(p.detach(), torch.tensor([1.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -1.0}, ValueError, r"lr must be in \[0.0, inf\)"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0.0, 1.0\)"),
        ({"betas": 0.9}, TypeError, "betas must be a pair"),
        ({"eps": -1e-8}, ValueError, "eps must be in"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be in"),
        ({"k": -1.0}, ValueError, r"k must be in \[0.0, inf\)"),
        ({"t0": math.nan}, ValueError, "t0 must be in"),
        ({"gamma": "big"}, TypeError, "gamma must be a float"),
        ({"pretrained": []}, ValueError, "pretrained must hold one tensor per parameter"),
    ],
)
def test_invalid_arguments(kwargs, error, match) -> None:
    model = make_model(0)
    with pytest.raises(error, match=match):
        RecAdam(model.parameters(), **kwargs)


def test_pretrained_shape_mismatch() -> None:
    model = make_model(0)
    anchors = [torch.zeros(1) for _ in model.parameters()]
    with pytest.raises(ValueError, match=r"pretrained\[0\] must be a tensor of shape"):
        RecAdam(model.parameters(), pretrained=anchors)


SCRIPT = """
import sys, torch
from tests.helpers import make_model
from tests.test_recadam import loss_of
from torch_seqreptile import RecAdam
def train(out, stop, resume):
  model = make_model(5)
  opt = RecAdam(model.parameters(), lr=0.01, weight_decay=0.01, k=0.5, t0=3, gamma=10.0)
  sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.2, total_iters=8)
  start = 0
  if resume != "-":
      ckpt = torch.load(resume, weights_only=True)
      model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
      sched.load_state_dict(ckpt["sched"]); start = ckpt["step"]
  for step in range(start, 8):
      if step == stop:
          torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                      "sched": sched.state_dict(), "step": step}, out)
          return
      opt.zero_grad(); loss_of(model, step).backward(); opt.step(); sched.step()
  torch.save({"model": model.state_dict()}, out)
if sys.argv[3] == "-":  # a full run and a run stopped at step 3, both from scratch
    train(sys.argv[1], -1, "-"); train(sys.argv[2], 3, "-")
else:
    train(sys.argv[1], -1, sys.argv[3])
"""


def test_fresh_process_resume_is_bit_exact(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]

    def run(*args: str) -> None:
        subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=root, check=True, timeout=120)

    run(str(tmp_path / "full.pt"), str(tmp_path / "ckpt.pt"), "-")
    run(str(tmp_path / "resumed.pt"), "-", str(tmp_path / "ckpt.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)["model"]
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["opt"]["state"]
    assert all("pretrained" in s for s in state.values())
