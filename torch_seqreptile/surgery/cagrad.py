"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float
from torch_seqreptile.surgery._base import (
    Array,
    GramianCombiner,
    TaskGramians,
    normalized_gramian,
)
from torch_seqreptile.surgery.mgda import min_norm_weights

RESCALES = (0, 1, 2)
#: ||g_w*|| below this fraction of max_t ||g_t|| is treated as the degenerate case g_w* = 0
_DEGENERATE = 1e-6


def _on_support(
    gram: Array, a: Array, radius: float, support: npt.NDArray[np.intp]
) -> tuple[Array, float] | None:
    r"""The exact optimum of line 3 if its support is ``support``, else ``None``.

    On the support, optimality reads :math:`\langle g_j, d\rangle = \lambda` with
    :math:`d = g_0 + r g_w/\|g_w\|`, i.e. :math:`w = (n/r) G_S^{-1}(\lambda 1 - a_S)`; with
    :math:`1^\top w = 1` and :math:`n^2 = w^\top G_S w` this is a quadratic in
    :math:`\lambda`. The candidate is accepted only if it satisfies the KKT conditions of the
    convex problem (``w >= 0``, :math:`\langle g_j, d\rangle \ge \lambda` for all j), which
    makes it the optimum.
    """
    sub = gram[np.ix_(support, support)]
    try:
        v1, va = np.linalg.solve(sub, np.stack([np.ones(len(support)), a[support]], axis=1)).T
    except np.linalg.LinAlgError:
        return None
    big_a, big_b = float(v1.sum()), float(va.sum())
    disc = big_b * big_b - big_a * (float(a[support] @ va) - radius * radius)
    if big_a <= 0.0 or disc < 0.0:
        return None
    lam = (big_b + math.sqrt(disc)) / big_a
    denominator = lam * big_a - big_b
    if denominator <= 0.0:
        return None
    w_support = (lam * v1 - va) / denominator
    if np.any(w_support < -1e-12):
        return None
    w = np.zeros(len(a))
    w[support] = np.maximum(w_support, 0.0)
    w /= w.sum()
    norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    if norm == 0.0:
        return None
    slack = a + (radius / norm) * (gram @ w) - lam  # <g_j, d> - lambda
    if np.min(slack) < -1e-9:  # gram is normalised: relative to the largest squared norm
        return None
    return w, norm


def cagrad_weights(gram: Array, c: float, rescale: int = 1, iterations: int = 100) -> Array:
    r"""CAGrad (Liu et al., 2021, Algorithm 1) on the Gramian; returns ``d = sum_t w_t g_t``.

    With :math:`g_0 = \frac1T\sum_t g_t` and :math:`r = c\,\|g_0\|`, line 3 solves
    :math:`\min_{w\in\Delta} F(w) = g_w^\top g_0 + r\,\|g_w\|` (:math:`g_w = \sum_t w_t g_t`)
    and line 4 sets :math:`d = g_0 + \frac{r}{\|g_w\|} g_w`; ``rescale`` divides d by 1
    (``0``), :math:`1 + c^2` (``1``, the authors' default) or :math:`1 + c` (``2``).

    Solver: :math:`\|v\| = \min_{s>0} \|v\|^2/(2s) + s/2`
    turns line 3 into :math:`\min_{s>0} h(s)`, :math:`h(s) = \min_w r\,\|g_w + (s/r) g_0\|^2
    /(2s) + \ldots`: for fixed s the inner problem is the min-norm point of the hull of
    :math:`g_t + (s/r) g_0` (Wolfe's algorithm on a shifted Gramian), h is convex and
    :math:`h'(s) = \frac r2 (1 - \|g_{w(s)}\|^2/s^2)`, so s* is found by bisection on the sign
    of :math:`s - \|g_{w(s)}\|` in :math:`[0, \max_t \|g_t\|]` to relative 2⁻¹⁰⁰. Usually
    the support of w is found first from a few guesses of s and the optimum is then computed
    in closed form on it and verified by its KKT conditions (``_on_support``); the
    bisection is the fallback.
    Degenerate case: if the optimum has :math:`g_w = 0` (s* = 0, possible only when 0 lies
    in the convex hull of the task gradients, i.e. they are Pareto-stationary) line 4 is
    undefined and d = g_0, as in the authors' code; numerically, ``||g_w*||`` below 1e-6 ×
    the largest task-gradient norm counts as 0.

    Scale-invariant: the weights of :math:`cG` are those of G for every c > 0 (it runs on
    :math:`G/\max_t G_{tt}`, so every tolerance is relative to the largest task gradient).
    """
    num_tasks = gram.shape[0]
    mean = np.full(num_tasks, 1.0 / num_tasks)
    normalized = normalized_gramian(gram)
    if normalized is None:  # every gradient is zero: d = g_0 = 0
        return mean
    gram = normalized
    a = gram @ mean  # <g_t, g_0>
    g0_sq = float(mean @ a)
    radius = c * math.sqrt(max(g0_sq, 0.0))
    if radius <= 0.0:
        return mean
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[rescale]

    def inner(s: float) -> tuple[Array, float]:
        beta = s / radius
        shifted = gram + beta * (a[:, None] + a[None, :]) + beta * beta * g0_sq
        w = min_norm_weights(shifted)
        return w, math.sqrt(max(float(w @ gram @ w), 0.0))

    low, high = 0.0, math.sqrt(max(float(np.max(np.diag(gram))), 0.0))
    top = high
    guess = min(math.sqrt(g0_sq), top)
    for _ in range(4):  # active set: support of w(s), exact solution on it, s <- ||g_w(s)||
        w, norm = inner(guess)
        exact = _on_support(gram, a, radius, np.flatnonzero(w > 1e-12))
        if exact is not None and exact[1] > _DEGENERATE * top:
            w, norm = exact
            return (mean + (radius / norm) * w) / divisor
        if norm <= 0.0:
            break
        guess = norm
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if mid <= low or mid >= high:
            break
        if inner(mid)[1] > mid:
            low = mid
        else:
            high = mid
    if high <= _DEGENERATE * top:  # s* = 0: g_w = 0 at the optimum, d is not unique there
        return mean / divisor  # the authors' code returns g_0 then as well
    w, norm = inner(0.5 * (low + high))
    if norm <= _DEGENERATE * top:
        return mean / divisor
    return (mean + (radius / norm) * w) / divisor


class CAGrad(GramianCombiner):
    r"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", 2021).

    The shared parameters get the direction d that maximises the worst task improvement
    :math:`\min_t \langle g_t, d\rangle` inside the ball
    :math:`\|d - g_0\| \le c\,\|g_0\|` around the mean gradient :math:`g_0` (their Eq. 4,
    Algorithm 1), computed on the T×T Gramian (:func:`cagrad_weights`); heads get their own
    gradient. ``c = 0`` is the mean gradient; larger c approaches MGDA-like behaviour.

    Example (with rescale 1, d is divided by :math:`1 + c^2`):

        >>> import torch
        >>> from torch_seqreptile.surgery import CAGrad
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = CAGrad(torch.optim.SGD([w], lr=0.1), c=0.5)
        >>> opt.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])])
        >>> [round(v, 6) for v in w.grad.tolist()]
        [0.2, 0.4]

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        c: radius factor, in [0, inf) (paper: 0.4 to 0.5 typical).
        rescale: divide d by 1 (``0``), ``1 + c**2`` (``1``, the authors' default) or
            ``1 + c`` (``2``).
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        error_if_nonfinite: see :class:`~torch_seqreptile.surgery.GradientCombiner`.

    Scale: like the mean gradient (1/T of MTL's sum), not of the sum.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        c: float = 0.5,
        *,
        rescale: int = 1,
        num_tasks: int | None = None,
        error_if_nonfinite: bool = True,
    ) -> None:
        super().__init__(optimizer, num_tasks=num_tasks, error_if_nonfinite=error_if_nonfinite)
        self.c = check_float("c", c, 0.0, math.inf, open_high=True)
        if isinstance(rescale, bool) or rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        self.rescale = int(rescale)

    def _update(self, problem: TaskGramians) -> Array:
        return cagrad_weights(problem.grams[0], self.c, self.rescale)[None, :]
