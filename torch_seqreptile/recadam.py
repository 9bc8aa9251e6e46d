"""RecAdam: Adam with annealed recall of the pretrained weights (Chen et al., EMNLP 2020)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float


def anneal_lambda(step: float, k: float, t0: float) -> float:
    r"""The sigmoid annealing :math:`\lambda(t) = 1 / (1 + e^{-k (t - t_0)})` (Eq. 7)."""
    x = k * (step - t0)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _warn_if_unstable(group: dict[str, Any], where: str) -> None:
    """Warn if the penalty's first step ``lr * gamma * (1 - λ(1))`` leaves (0, 2)."""
    factor = group["lr"] * group["gamma"] * (1.0 - anneal_lambda(1.0, group["k"], group["t0"]))
    if factor >= 2.0:
        warnings.warn(
            f"RecAdam {where}: lr * gamma * (1 - lambda(1)) = {factor:.3g} >= 2, so the recall "
            "penalty diverges (theta - theta* grows by a factor |1 - lr*gamma*(1-lambda)| per "
            "step); lower lr or gamma (the authors use lr 2e-5 with gamma 5000)",
            RuntimeWarning,
            stacklevel=3,
        )


class RecAdam(Optimizer):
    r"""RecAdam (Chen et al., "Recall and Learn: Fine-tuning Deep Pretrained Language Models
    with Less Forgetting", EMNLP 2020).

    Fine-tuning minimises :math:`\lambda(t) L_T + (1-\lambda(t))\,\frac{\gamma}{2}
    \sum_i (\theta_i - \theta_i^*)^2` (their Eq. 6-7), the quadratic penalty simulating the
    pretraining tasks and :math:`\lambda(t) = \mathrm{sigmoid}(k (t - t_0))` moving the
    objective from recalling to learning. As in the authors' optimizer, the penalty is
    *decoupled* from the Adam moments (like AdamW's weight decay); per parameter and step t:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \alpha_t = \mathrm{lr}\,\sqrt{1-\beta_2^t}/(1-\beta_1^t) \\
        \theta \leftarrow \theta - \alpha_t\,\lambda(t)\, m / (\sqrt v + \epsilon),\quad
        \theta \leftarrow \theta - \mathrm{lr}\,(1-\lambda(t))\,\gamma\,(\theta - \theta^*),\quad
        \theta \leftarrow \theta - \mathrm{lr}\cdot\mathrm{wd}\cdot\theta

    (each line uses the θ of the line before; ε is added to √v before bias correction, as in
    the authors' code, which differs from ``torch.optim.AdamW``). With ``gamma=0`` and
    λ ≡ 1 it is Adam.

    **Stability.** The penalty line multiplies :math:`\theta - \theta^*` by
    :math:`1 - \mathrm{lr}\,(1-\lambda(t))\,\gamma`, so it converges only while
    :math:`\mathrm{lr}\,(1-\lambda(t))\,\gamma < 2`; the largest :math:`1-\lambda` is at
    the first step. A group whose ``lr * gamma * (1 - λ(1))`` is 2 or more (the weights would
    oscillate around θ* with a growing amplitude) raises a ``RuntimeWarning`` at construction
    and in ``add_param_group``; a scheduler that raises ``lr`` later is not checked. The
    defaults are the authors' (their GLUE script: lr 2e-5, γ = 5000, k = 0.5, t0 = 250), for
    which ``lr * gamma`` = 0.1.

    The pretrained weights θ* are copied from the parameters at construction (or taken from
    ``pretrained``) and kept in ``state[p]["pretrained"]``, so they are in ``state_dict``
    (loadable with ``torch.load(weights_only=True)``). Memory: Adam's two buffers plus one
    copy of the parameters.

    Example:
        >>> import torch
        >>> from torch_seqreptile import RecAdam
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = RecAdam([p])  # the authors' defaults; theta* = the values now
        >>> opt.state[p]["pretrained"].tolist()
        [1.0, 1.0]

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate, in [0, inf) (default 2e-5, the authors' BERT-base learning rate).
        betas: Adam's coefficients, each in [0, 1).
        eps: in [0, inf) (authors' default 1e-6).
        weight_decay: decoupled weight decay, in [0, inf).
        k: sigmoid steepness, in [0, inf) (paper grid: 0.05 to 1; 0 gives λ ≡ 0.5).
        t0: sigmoid midpoint in steps, in [0, inf) (paper grid: 100 to 1000).
        gamma: penalty coefficient γ, in [0, inf) (paper: 5000).
        pretrained: the pretrained tensors θ*, one per parameter in ``param_groups`` order
            (default: the parameters' values now).
        correct_bias: Adam bias correction (default True).
    """

    #: state that is part of the set-up, not of the optimisation: ``SeqReptile(...,
    #: reset_inner_state=True)`` keeps it when it resets the inner state
    persistent_state_keys = ("pretrained",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        k: float = 0.5,
        t0: float = 250.0,
        gamma: float = 5000.0,
        pretrained: Iterable[Tensor] | None = None,
        correct_bias: bool = True,
    ) -> None:
        inf = math.inf
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
        defaults = {
            "lr": check_float("lr", lr, 0.0, inf, open_high=True),
            "betas": (
                check_float("betas[0]", betas[0], 0.0, 1.0, open_high=True),
                check_float("betas[1]", betas[1], 0.0, 1.0, open_high=True),
            ),
            "eps": check_float("eps", eps, 0.0, inf, open_high=True),
            "weight_decay": check_float("weight_decay", weight_decay, 0.0, inf, open_high=True),
            "k": check_float("k", k, 0.0, inf, open_high=True),
            "t0": check_float("t0", t0, 0.0, inf, open_high=True),
            "gamma": check_float("gamma", gamma, 0.0, inf, open_high=True),
            "correct_bias": bool(correct_bias),
        }
        super().__init__(params, defaults)
        own = [p for group in self.param_groups for p in group["params"]]
        if pretrained is None:
            anchors = [p.detach() for p in own]
        else:
            anchors = list(pretrained)
            if len(anchors) != len(own):
                raise ValueError(
                    f"pretrained must hold one tensor per parameter ({len(own)}), "
                    f"got {len(anchors)}"
                )
            for i, (p, a) in enumerate(zip(own, anchors)):
                if not isinstance(a, Tensor) or a.shape != p.shape:
                    raise ValueError(
                        f"pretrained[{i}] must be a tensor of shape {tuple(p.shape)}, got "
                        f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}"
                    )
        for p, a in zip(own, anchors):
            self.state[p]["pretrained"] = a.detach().to(p, copy=True)
        for index, group in enumerate(self.param_groups):
            _warn_if_unstable(group, f"param_groups[{index}]")
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its pretrained weights are the parameters' values now."""
        super().add_param_group(param_group)
        if getattr(self, "_built", False):  # a user's call; the constructor warns itself
            _warn_if_unstable(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
        if hasattr(self, "state"):
            for p in self.param_groups[-1]["params"]:
                if "pretrained" not in self.state[p]:
                    self.state[p]["pretrained"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One RecAdam step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, gamma, decay = group["lr"], group["gamma"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RecAdam does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                lam = anneal_lambda(step, group["k"], group["t0"])
                p.addcdiv_(exp_avg, denom, value=-step_size * lam)
                p.add_(p - state["pretrained"], alpha=-lr * (1.0 - lam) * gamma)
                if decay > 0.0:
                    p.add_(p, alpha=-lr * decay)
        return loss
