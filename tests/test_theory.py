"""Property-based checks of the mathematics of Lee et al. (ICLR 2022), Sec. 3 and Appendix C.

Every claim is checked *through the library's public optimizers*: ``SeqReptile`` and
``Reptile`` wrapping ``torch.optim.SGD`` (inner step size alpha) on float64 parameters; the
meta-gradient is read back from the outer update they perform,
``MG(phi) = (phi - phi_new) / eta`` (Eq. 3 and 6). Everything the paper expands around phi
(task gradients and Hessians) comes from ``torch.func``; nothing is differentiated by hand.

Notation. For a task sequence t_1..t_K and SGD inner steps theta_k = theta_{k-1} - alpha g_k
(Eq. 5/10), let gbar_t and Hbar_t be the gradient and Hessian of task t's loss at phi. As a
function of alpha, sum_k g_k is smooth, with Taylor series

    sum_k g_k = c0 + alpha c1 + alpha^2 c2 + alpha^3 c3 + ...

Appendix C's claim is c0 = sum_k gbar_{t_k} and c1 = -sum_k Hbar_{t_k} sum_{j<k} gbar_{t_j}.
The tests compute c0..c3 independently of the library *and* of the paper, by forward-mode
differentiation in alpha (``torch.func.jacfwd``) of the SGD trajectory written as a pure
function (``taylor_coefficients``); they check the paper's c0, c1 against them, then check the
library: MG/alpha - (c0 + alpha c1) = alpha^2 c2 + O(alpha^3), i.e. halving alpha divides the
residual by 4 (log-log slope 2), and its leading coefficient is c2.

Alpha grid and slope tolerance. The grid is alpha_0 / 2^i, i = 0..4, with alpha_0 the
smallest of 0.02 / (K * curvature) (each inner step moves theta by ~2% of the curvature
scale; curvature = largest Hessian norm at phi), 0.1 |c1| / |c2| and 0.1 |c2| / |c3|. The
last two put the whole grid in the asymptotic regime even where a coefficient nearly cancels
(e.g. in one dimension with gradients of opposite sign): there rho = |c3| alpha / |c2| <= 0.1,
and the local slope of |c2| alpha^2 (1 + rho) is 2 + log2((1 + rho) / (1 + rho / 2)) <= 2.07.
``SLOPE_TOL`` = 0.25 leaves room for the alpha^4 term and rounding, and still rejects every
wrong expansion: dropping or flipping the alpha term leaves a residual ~ alpha |c1|
(slope 1). Each test applies the *same* assertion to those wrong expansions and requires it
to fail. Draws whose alpha^2 term would sink into float64 rounding on that grid
(|c2| alpha_min^2 < 100 x the rounding scale of MG/alpha) are discarded with ``assume``; they are
rare (``--hypothesis-show-statistics`` shows how rare).

The default Hypothesis profile keeps this file at about half a minute on two cores;
``HYPOTHESIS_PROFILE=thorough`` (tests/conftest.py) runs ten times as many examples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.helpers import slow_by_index
from torch_seqreptile import Reptile, SeqReptile
from torch_seqreptile._interpolate import OUTER_IMPLS

# torch.func's Hessians go through TorchScript decompositions in recent torch releases,
# which warn that torch.jit.script is deprecated; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

F64 = torch.float64
EPS = torch.finfo(F64).eps
FAMILIES = ("quadratic", "softplus", "logsumexp")
ROWS = 4  # rows of the softplus / log-sum-exp design matrices
SLOPE_TOL = 0.25
NUM_ALPHAS = 5
STEP_SCALE = 0.02  # alpha_0 <= STEP_SCALE / (K * curvature)
RATIO = 0.1  # alpha_0 <= RATIO * |c_n| / |c_{n+1}|
RESOLVE = 100.0  # |c2| alpha_min^2 >= RESOLVE * rounding scale


def budget(examples: int) -> int:
    """``examples`` under Hypothesis' default profile, scaled by the loaded profile.

    Budgets are written for the default ``max_examples`` of 100, so the ``thorough`` profile
    (``max_examples=1000``, tests/conftest.py) runs ten times as many.
    """
    return max(1, examples * settings.default.max_examples // 100)


def theory_settings(examples: int) -> settings:
    return settings(
        max_examples=budget(examples),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# ---------------------------------------------------------------------------- task losses
class SmoothTasks:
    """``num_tasks`` smooth losses L_t: R^dim -> R of one family, and a point phi.

    * ``quadratic``: 1/2 (x - m_t)^T A_t (x - m_t), A_t random positive definite;
    * ``softplus``: sum_r softplus(<w_tr, x> + b_tr) (logistic-regression-like);
    * ``logsumexp``: log sum_r exp(<w_tr, x> + b_tr) (softmax-regression-like);
    * ``cone``: s_t |x - c_t|, with |phi - c_t| in [1, 2]: away from c_t it is smooth and its
      gradient has the constant norm s_t, so |grad L_t|^2 does not depend on x.

    ``losses(tasks, x)`` evaluates row i of ``x`` (n, dim) on task ``tasks[i]``, so one
    parameter of n rows holds n independent trajectories (SGD and the outer update act
    elementwise).
    """

    def __init__(self, family: str, num_tasks: int, dim: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.family, self.num_tasks, self.dim, self.seed = family, num_tasks, dim, seed
        self.phi = torch.randn(dim, generator=gen, dtype=F64)
        if family == "quadratic":
            m = torch.randn(num_tasks, dim, dim, generator=gen, dtype=F64)
            self.hess = m @ m.mT / dim + 0.2 * torch.eye(dim, dtype=F64)
            self.center = torch.randn(num_tasks, dim, generator=gen, dtype=F64)
        elif family in ("softplus", "logsumexp"):
            self.weight = torch.randn(num_tasks, ROWS, dim, generator=gen, dtype=F64)
            self.weight /= math.sqrt(dim)
            self.bias = torch.randn(num_tasks, ROWS, generator=gen, dtype=F64)
        elif family == "cone":
            direction = torch.randn(num_tasks, dim, generator=gen, dtype=F64)
            direction /= direction.norm(dim=1, keepdim=True)
            radius = 1.0 + torch.rand(num_tasks, 1, generator=gen, dtype=F64)
            self.center = self.phi + radius * direction
            self.scale = 0.5 + torch.rand(num_tasks, generator=gen, dtype=F64)
        else:
            raise ValueError(f"unknown family {family!r}")

    def __repr__(self) -> str:
        return f"SmoothTasks({self.family!r}, {self.num_tasks}, {self.dim}, seed={self.seed})"

    def losses(self, tasks: Tensor, x: Tensor) -> Tensor:
        if self.family == "quadratic":
            diff = x - self.center[tasks]
            return 0.5 * torch.einsum("ni,nij,nj->n", diff, self.hess[tasks], diff)
        if self.family == "cone":
            return self.scale[tasks] * (x - self.center[tasks]).norm(dim=-1)
        z = torch.einsum("nrd,nd->nr", self.weight[tasks], x) + self.bias[tasks]
        if self.family == "softplus":
            return F.softplus(z).sum(-1)
        return torch.logsumexp(z, -1)

    def loss(self, task: int) -> Callable[[Tensor], Tensor]:
        index = torch.tensor([task])
        return lambda x: self.losses(index, x.unsqueeze(0)).squeeze(0)

    def derivatives(self) -> list[tuple[Tensor, Tensor]]:
        """(gradient, Hessian) of every task loss at phi, by torch.func."""
        return [
            (torch.func.grad(self.loss(t))(self.phi), torch.func.hessian(self.loss(t))(self.phi))
            for t in range(self.num_tasks)
        ]

    def curvature(self) -> float:
        return max(float(torch.linalg.matrix_norm(h, 2)) for _, h in self.derivatives())


# ---------------------------------------------------------------------------- the library
def run_seqreptile(
    tasks: SmoothTasks, sequences: Tensor, alpha: float, outer_lr: float
) -> tuple[Tensor, Tensor]:
    """Run one SeqReptile trajectory per row of ``sequences`` (n, K), all from phi.

    Returns MG(phi) = (phi - phi_new) / outer_lr per row, read from the library's outer update
    (Eq. 6), and alpha * sum_k g_k over the gradients the library saw, per row (Eq. 10).
    """
    n, inner_steps = sequences.shape
    theta = nn.Parameter(tasks.phi.expand(n, -1).clone())
    opt = SeqReptile(torch.optim.SGD([theta], lr=alpha), inner_steps, outer_lr)
    grad_sum = torch.zeros_like(theta)
    for k in range(inner_steps):
        opt.zero_grad()
        tasks.losses(sequences[:, k], theta).sum().backward()
        assert theta.grad is not None
        grad_sum += theta.grad
        opt.step()
    assert opt.trajectory_step == 0, "the K-th step must do the outer update"
    phi_new = slow_by_index(opt)[0]
    assert torch.equal(theta.detach(), phi_new), "theta <- phi after the outer update"
    return (tasks.phi - phi_new) / outer_lr, alpha * grad_sum


def run_reptile(
    tasks: SmoothTasks, inner_steps: int, alpha: float, outer_lr: float
) -> tuple[Tensor, Tensor]:
    """One Reptile round (T trajectories of K steps from phi, Eq. 2-3), fed the task it asks for.

    Returns MG(phi) = (phi - phi_new) / outer_lr and (alpha / T) sum_t sum_k g_{t,k}.
    """
    theta = nn.Parameter(tasks.phi.clone())
    opt = Reptile(torch.optim.SGD([theta], lr=alpha), inner_steps, outer_lr, tasks.num_tasks)
    grad_sum = torch.zeros_like(theta)
    fed = []
    for _ in range(tasks.num_tasks * inner_steps):
        fed.append(opt.current_task)
        opt.zero_grad()
        tasks.loss(opt.current_task)(theta).backward()
        assert theta.grad is not None
        grad_sum += theta.grad
        opt.step()
    assert fed == [t for t in range(tasks.num_tasks) for _ in range(inner_steps)]
    phi_new = slow_by_index(opt)[0]
    assert torch.equal(theta.detach(), phi_new)
    return (tasks.phi - phi_new) / outer_lr, alpha * grad_sum / tasks.num_tasks


# ---------------------------------------------------------------------------- the expansions
Sequences = list[tuple[int, ...]]


def all_sequences(
    num_tasks: int, inner_steps: int, p: Sequence[float]
) -> tuple[Sequences, list[float]]:
    """All T^K task sequences and their probabilities prod_k p_{t_k} (t_k i.i.d. ~ Cat(p))."""
    sequences = list(itertools.product(range(num_tasks), repeat=inner_steps))
    return sequences, [math.prod(p[t] for t in seq) for seq in sequences]


def reptile_sequences(num_tasks: int, inner_steps: int) -> tuple[Sequences, list[float]]:
    """Reptile's T constant sequences (t, ..., t), each with weight 1/T (Eq. 3's mean)."""
    return [(t,) * inner_steps for t in range(num_tasks)], [1.0 / num_tasks] * num_tasks


def paper_terms(
    tasks: SmoothTasks, sequences: Sequences, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Appendix C's two terms, E[sum_k gbar_{t_k}] and E[-sum_k Hbar_{t_k} sum_{j<k} gbar_{t_j}]."""
    derivs = tasks.derivatives()
    c0 = torch.zeros_like(tasks.phi)
    c1 = torch.zeros_like(tasks.phi)
    for seq, w in zip(sequences, weights):
        prefix = torch.zeros_like(tasks.phi)
        for t in seq:
            g, h = derivs[t]
            c0 = c0 + w * g
            c1 = c1 - w * (h @ prefix)
            prefix = prefix + g
    return c0, c1


def taylor_coefficients(
    tasks: SmoothTasks, sequences: Sequences, weights: Sequence[float], order: int = 3
) -> list[Tensor]:
    """c_0..c_order of E[sum_k g_k] = sum_n c_n alpha^n, independently of paper and library:
    the SGD trajectory as a pure function of alpha, differentiated at alpha = 0 by jacfwd."""
    rows = torch.tensor(sequences)
    w = torch.tensor(weights, dtype=F64)

    def expected_grad_sum(alpha: Tensor) -> Tensor:
        x = tasks.phi.expand(len(sequences), -1)
        total = torch.zeros_like(x)
        for k in range(rows.shape[1]):
            g = torch.func.grad(lambda y, k=k: tasks.losses(rows[:, k], y).sum())(x)
            total = total + g
            x = x - alpha * g
        return w @ total

    # h_n(alpha) = (f^(n)(alpha), [f(alpha), ..., f^(n-1)(alpha)]): one pass per order.
    def lift(h: Callable[[Tensor], tuple[Tensor, list[Tensor]]]) -> Callable:
        def value_and_lower(alpha: Tensor) -> tuple[Tensor, list[Tensor]]:
            value, lower = h(alpha)
            return value, [*lower, value]

        return torch.func.jacfwd(value_and_lower, has_aux=True)

    def h(alpha: Tensor) -> tuple[Tensor, list[Tensor]]:
        return expected_grad_sum(alpha), []

    for _ in range(order):
        h = lift(h)  # type: ignore[assignment]
    top, lower = h(torch.zeros((), dtype=F64))
    return [d / math.factorial(n) for n, d in enumerate([*lower, top])]


def objective_gradients(
    tasks: SmoothTasks, sequences: Sequences, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Gradients at phi of E[sum_k L_{t_k}] and E[sum_k sum_{j<k} <grad L_{t_k}, grad L_{t_j}>].

    The expectation is the literal weighted sum over the given sequences (Eq. 7 with all
    T^K sequences and weights prod_k p_{t_k}; Eq. 4 with Reptile's constant sequences), and
    every derivative, the inner gradients included, is taken by torch.func.
    """

    def expected(x: Tensor) -> tuple[Tensor, Tensor]:
        losses = [tasks.loss(t)(x) for t in range(tasks.num_tasks)]
        grads = [torch.func.grad(tasks.loss(t))(x) for t in range(tasks.num_tasks)]
        first = x.new_zeros(())
        align = x.new_zeros(())
        for seq, w in zip(sequences, weights):
            first = first + w * sum(losses[t] for t in seq)
            for k in range(len(seq)):
                for j in range(k):
                    align = align + w * (grads[seq[k]] @ grads[seq[j]])
        return first, align

    g0 = torch.func.grad(lambda x: expected(x)[0])(tasks.phi)
    g1 = torch.func.grad(lambda x: expected(x)[1])(tasks.phi)
    return g0, g1


# ---------------------------------------------------------------------------- slopes
def alpha_grid(
    inner_steps: int, curvature: float, coefficients: Sequence[Tensor] | None = None
) -> list[float]:
    """alpha_0 / 2^i, i < NUM_ALPHAS; alpha_0 as in the module docstring."""
    alpha0 = STEP_SCALE / (inner_steps * max(curvature, 0.1))
    if coefficients is not None:
        norms = [float(c.norm()) for c in coefficients]
        for low, high in itertools.pairwise(norms[1:]):
            if high > 0:
                alpha0 = min(alpha0, RATIO * low / high)
    return [alpha0 / 2**i for i in range(NUM_ALPHAS)]


def loglog_slope(alphas: Sequence[float], residuals: Sequence[float]) -> float:
    """Least-squares slope of log(residual) against log(alpha); nan if a residual is <= 0."""
    res = np.asarray(residuals, dtype=np.float64)
    if not np.all(res > 0) or not np.all(np.isfinite(res)):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(alphas)), np.log(res), 1)[0])


def assert_order(
    alphas: Sequence[float], residuals: Sequence[float], order: int, what: str
) -> None:
    """The residuals shrink like alpha^order: fitted log-log slope within SLOPE_TOL of it."""
    slope = loglog_slope(alphas, residuals)
    assert abs(slope - order) <= SLOPE_TOL, (
        f"{what}: residual ~ alpha^{slope:.3f}, expected alpha^{order} +- {SLOPE_TOL}; "
        f"alphas {list(alphas)}, residuals {list(residuals)}"
    )


def assert_rejected(alphas: Sequence[float], residuals: Sequence[float], order: int) -> None:
    """The same assertion must fail on a wrong expansion: the test can fail."""
    with pytest.raises(AssertionError):
        assert_order(alphas, residuals, order, "wrong expansion")


def rounding(tasks: SmoothTasks, alpha: float, outer_lr: float) -> float:
    """Scale of the float64 rounding in MG / alpha = (phi - phi_new) / (eta alpha)."""
    size = float(tasks.phi.abs().max()) + 1.0
    return EPS * size * math.sqrt(tasks.dim) / (outer_lr * alpha)


def roundoff(tasks: SmoothTasks, alpha: float, outer_lr: float) -> float:
    """Generous bound on that rounding, for results that are exact in exact arithmetic."""
    return 1e3 * rounding(tasks, alpha, outer_lr)


def resolvable(c2: Tensor, alphas: Sequence[float], tasks: SmoothTasks, outer_lr: float) -> bool:
    """Is the alpha^2 term far (RESOLVE x) above the rounding scale at the smallest alpha?"""
    alpha = alphas[-1]
    return float(c2.norm()) * alpha**2 >= RESOLVE * rounding(tasks, alpha, outer_lr)


@dataclass
class Measurement:
    """Residuals of an affine prediction of MG/alpha on the alpha grid (``measure``)."""

    alphas: list[float]
    residuals: list[float]  # |MG/alpha - predicted(alpha)|
    dropped: list[float]  # wrong: alpha term dropped, |MG/alpha - predicted(0)|
    flipped: list[float]  # wrong: alpha term with + instead of -
    bounds: list[float]  # roundoff(alpha): what an exact result may differ by
    leading: Tensor  # (MG/alpha - predicted(alpha)) / alpha^2 at the smallest alpha
    c2: Tensor
    exact: bool  # quadratics with K = 2: the expansion is exact
    resolvable: bool


def measure(
    tasks: SmoothTasks,
    scaled_meta_gradient: Callable[[float], Tensor],
    predicted: Callable[[float], Tensor],
    coefficients: Sequence[Tensor],
    inner_steps: int,
    outer_lr: float,
) -> Measurement:
    """Run the library on the alpha grid and compare MG/alpha with ``predicted(alpha)``.

    ``predicted`` is affine in alpha; the wrong variants drop its alpha term
    (``predicted(0)``) or flip its sign (``2 predicted(0) - predicted(alpha)``). For
    quadratics with K = 2 the expansion is exact (g_2 = gbar_2 - alpha Hbar_2 gbar_1).
    Unresolvable draws (module docstring) are not run.
    """
    exact = tasks.family == "quadratic" and inner_steps == 2
    alphas = alpha_grid(inner_steps, tasks.curvature(), None if exact else coefficients)
    c2 = coefficients[2]
    result = Measurement(alphas, [], [], [], [], c2, c2, exact, True)
    if not exact and not resolvable(c2, alphas, tasks, outer_lr):
        result.resolvable = False
        return result
    for alpha in alphas:
        scaled = scaled_meta_gradient(alpha)
        result.residuals.append(float((scaled - predicted(alpha)).norm()))
        result.dropped.append(float((scaled - predicted(0.0)).norm()))
        result.flipped.append(float((scaled - 2 * predicted(0.0) + predicted(alpha)).norm()))
        result.bounds.append(roundoff(tasks, alpha, outer_lr))
        result.leading = (scaled - predicted(alpha)) / alpha**2
    return result


def check_second_order(m: Measurement, what: str) -> None:
    """Residual = alpha^2 c2 + O(alpha^3) (exact: rounding only); wrong variants rejected."""
    assume(m.resolvable)
    if m.exact:
        for alpha, r, bound in zip(m.alphas, m.residuals, m.bounds):
            assert r <= bound, (what, alpha, r, bound)
    else:
        assert_order(m.alphas, m.residuals, 2, what)
        # The residual is the next Taylor term: |residual / alpha^2 - c2| <~ rho |c2|.
        assert float((m.leading - m.c2).norm()) <= 0.05 * float(m.c2.norm()), (what, m)
    assert_rejected(m.alphas, m.dropped, 2)
    assert_rejected(m.alphas, m.flipped, 2)


# ---------------------------------------------------------------------------- strategies
@st.composite
def problems(
    draw: st.DrawFn, families: Sequence[str] = FAMILIES, max_tasks: int = 4, max_steps: int = 6
) -> tuple[SmoothTasks, tuple[int, ...]]:
    family = draw(st.sampled_from(families))
    num_tasks = draw(st.integers(1, max_tasks))
    dim = draw(st.integers(1, 6))
    inner_steps = draw(st.integers(2, max_steps))
    sequence = draw(
        st.lists(st.integers(0, num_tasks - 1), min_size=inner_steps, max_size=inner_steps)
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return SmoothTasks(family, num_tasks, dim, seed), tuple(sequence)


@st.composite
def probabilities(draw: st.DrawFn, num_tasks: int) -> list[float]:
    raw = draw(st.lists(st.floats(0.05, 1.0), min_size=num_tasks, max_size=num_tasks))
    total = sum(raw)
    return [r / total for r in raw]


outer_lrs = st.floats(0.1, 1.0)


# ---------------------------------------------------------------------------- 1. Appendix C
@theory_settings(30)
@given(problem=problems(), outer_lr=outer_lrs)
def test_appendix_c_second_order_expansion_of_one_trajectory(
    problem: tuple[SmoothTasks, tuple[int, ...]], outer_lr: float
) -> None:
    """For any task sequence t_1..t_K, SeqReptile's MG(phi) = phi - theta_K = alpha sum_k g_k
    (to rounding), and sum_k g_k = sum_k gbar_k - alpha sum_k Hbar_k sum_{j<k} gbar_j
    + O(alpha^2) (Appendix C): the residual has log-log slope 2 and leading term alpha^2 c2.
    The paper's two terms equal the Taylor coefficients c0, c1 of the trajectory."""
    tasks, sequence = problem
    sequences, weights = [sequence], [1.0]
    c = taylor_coefficients(tasks, sequences, weights)
    c0, c1 = paper_terms(tasks, sequences, weights)
    torch.testing.assert_close(c0, c[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c1, c[1], rtol=1e-10, atol=1e-12)
    rows = torch.tensor(sequences)

    def scaled_meta_gradient(alpha: float) -> Tensor:
        mg, alpha_grad_sum = run_seqreptile(tasks, rows, alpha, outer_lr)
        # Step identity: MG(phi) = phi - theta_K = alpha sum_k g_k (Eq. 10 summed).
        atol = alpha * roundoff(tasks, alpha, outer_lr)
        torch.testing.assert_close(mg, alpha_grad_sum, rtol=1e-9, atol=atol)
        return mg[0] / alpha

    m = measure(tasks, scaled_meta_gradient, lambda a: c0 + a * c1, c, len(sequence), outer_lr)
    check_second_order(m, "Appendix C")


# ---------------------------------------------------------------------------- 2. Eq. 7 / 13
@theory_settings(20)
@given(data=st.data(), outer_lr=outer_lrs)
def test_eq7_expected_meta_gradient_of_seqreptile(data: st.DataObject, outer_lr: float) -> None:
    """E[MG(phi)] / alpha = grad E[sum_k L_{t_k} - alpha/2 sum_k sum_{j<k}
    <grad L_{t_k}, grad L_{t_j}>] + O(alpha^2), tasks i.i.d. from Cat(p) (Eq. 7 and 13).

    The expectation is exact: all T^K sequences run through SeqReptile (one parameter row
    each) and are weighted by prod_k p_{t_k}; the right-hand side is differentiated, as
    written, by torch.func. Also checked: the symmetrisation step of the proof,
    E[-sum_k Hbar_k sum_{j<k} gbar_j] = -1/2 grad E[sum_{j<k} <gbar_k, gbar_j>], which needs
    the tasks to be exchangeable (i.i.d. sampling). Wrong sign / dropped term are rejected.
    """
    tasks, sequence = data.draw(problems(max_tasks=3, max_steps=4))
    inner_steps = len(sequence)
    p = data.draw(probabilities(tasks.num_tasks))
    sequences, weights = all_sequences(tasks.num_tasks, inner_steps, p)
    c = taylor_coefficients(tasks, sequences, weights)
    c0, c1 = paper_terms(tasks, sequences, weights)
    g0, g1 = objective_gradients(tasks, sequences, weights)
    for paper, other in ((c0, c[0]), (c1, c[1]), (c0, g0), (c1, -0.5 * g1)):
        torch.testing.assert_close(paper, other, rtol=1e-10, atol=1e-12)
    w = torch.tensor(weights, dtype=F64)
    rows = torch.tensor(sequences)

    def scaled_meta_gradient(alpha: float) -> Tensor:
        mg, _ = run_seqreptile(tasks, rows, alpha, outer_lr)
        return w @ mg / alpha

    m = measure(tasks, scaled_meta_gradient, lambda a: g0 - a / 2 * g1, c, inner_steps, outer_lr)
    check_second_order(m, "Eq. 7")


@theory_settings(20)
@given(problem=problems(max_tasks=4, max_steps=5), outer_lr=outer_lrs)
def test_eq4_meta_gradient_of_reptile(
    problem: tuple[SmoothTasks, tuple[int, ...]], outer_lr: float
) -> None:
    """Reptile: MG(phi) / alpha = grad (1/T) sum_t [K L_t - alpha/2 sum_k sum_{j<k}
    <grad L_t, grad L_t>] + O(alpha^2) (Eq. 3-4; each task's batches are the task's loss).

    Each trajectory is a constant task sequence restarted at phi, so only same-task pairs
    appear. Also the step identity MG = (alpha/T) sum_t sum_k g_{t,k}, and rejection of the
    wrong variants.
    """
    tasks, sequence = problem
    inner_steps = len(sequence)
    sequences, weights = reptile_sequences(tasks.num_tasks, inner_steps)
    c = taylor_coefficients(tasks, sequences, weights)
    g0, g1 = objective_gradients(tasks, sequences, weights)
    torch.testing.assert_close(g0, c[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(-0.5 * g1, c[1], rtol=1e-10, atol=1e-12)

    def scaled_meta_gradient(alpha: float) -> Tensor:
        mg, alpha_grad_mean = run_reptile(tasks, inner_steps, alpha, outer_lr)
        atol = alpha * roundoff(tasks, alpha, outer_lr)
        torch.testing.assert_close(mg, alpha_grad_mean, rtol=1e-9, atol=atol)
        return mg / alpha

    m = measure(tasks, scaled_meta_gradient, lambda a: g0 - a / 2 * g1, c, inner_steps, outer_lr)
    check_second_order(m, "Eq. 4")


# ---------------------------------------------------------------------------- 3. Eq. 4 vs Eq. 7
@theory_settings(15)
@given(data=st.data(), outer_lr=outer_lrs)
def test_inter_task_alignment_seqreptile_versus_reptile(
    data: st.DataObject, outer_lr: float
) -> None:
    """SeqReptile's alignment term pairs different tasks (Eq. 7); Reptile's pairs one task (Eq. 4).

    Construction: cone losses L_t(x) = s_t |x - c_t| (``SmoothTasks("cone")``). Their gradient
    has constant norm s_t, so the same-task products <grad L_t, grad L_t> = s_t^2 do not depend
    on phi and their gradient is zero (checked with torch.func); only the cross-task products
    <grad L_a, grad L_b>, a != b, can change with phi.

    What the equations predict for the O(alpha) correction c(alpha) = (E[MG]/alpha - E[c0]) /
    alpha, with X_q(phi) = sum_{a != b} q_a q_b <grad L_a, grad L_b> and P = K (K-1) / 2 pairs:

    * SeqReptile (Eq. 7, t_k i.i.d. ~ Cat(p)): E[sum_{j<k} <gbar_{t_k}, gbar_{t_j}>] =
      P sum_{a,b} p_a p_b <gbar_a, gbar_b> = P (X_p + sum_a p_a^2 s_a^2); the diagonal part is
      constant, so c(alpha) -> -(P/2) grad X_p, exactly the cross-task alignment gradient.
      Checked: |c(alpha) + (P/2) grad X_p| shrinks like alpha (slope 1), and the same assertion
      rejects the intra-task-only prediction c -> 0.
    * Reptile (Eq. 4): every pair is within one task, sum_{j<k} <gbar_t, gbar_t> = P s_t^2 is
      constant, so the correction is zero. On a cone it is zero to all orders: gradient descent
      moves straight along the ray to c_t, where the gradient does not change. Checked:
      |c(alpha)| is rounding only, and the same assertion with the cross-task target
      -(P/2) grad X_u (u uniform, Reptile's weights) is rejected. A Reptile that did not
      restart each task's trajectory at phi would pick up cross-task terms and fail here.
    """
    num_tasks = data.draw(st.integers(2, 3))
    dim = data.draw(st.integers(2, 5))
    inner_steps = data.draw(st.integers(2, 4))
    tasks = SmoothTasks("cone", num_tasks, dim, data.draw(st.integers(0, 2**32 - 1)))
    p = data.draw(probabilities(num_tasks))
    m = measure_cross_task(tasks, p, inner_steps, outer_lr)
    zero = torch.zeros(dim, dtype=F64)
    for grad_norm_sq in m.same_task_gradients:  # grad_phi |grad L_t|^2 = 2 Hbar_t gbar_t
        torch.testing.assert_close(grad_norm_sq, zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.seq_c[1], m.seq_target, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.reptile_c[1], zero, rtol=0, atol=1e-12)
    assume(m.resolvable)
    for alpha, r in zip(m.alphas, m.reptile_correction):
        assert r <= roundoff(tasks, alpha, outer_lr) / alpha, ("Reptile correction", alpha, r)
    assert_order(m.alphas, m.seq_residuals, 1, "SeqReptile correction vs cross-task gradient")
    assert_rejected(m.alphas, m.seq_intra_only, 1)
    assert_rejected(m.alphas, m.reptile_residuals, 1)


@dataclass
class CrossTaskMeasurement:
    """What ``test_inter_task_alignment_seqreptile_versus_reptile`` checks, measured."""

    same_task_gradients: list[Tensor]  # grad |grad L_t|^2 at phi, per task
    seq_target: Tensor  # -(P/2) grad X_p
    seq_c: list[Tensor]  # Taylor coefficients of E[sum_k g_k] (SeqReptile)
    reptile_c: list[Tensor]  # ... of Reptile's mean over tasks
    alphas: list[float]
    resolvable: bool
    seq_residuals: list[float]  # |c_seq(alpha) + (P/2) grad X_p|
    seq_intra_only: list[float]  # |c_seq(alpha) - 0|
    reptile_correction: list[float]  # |c_reptile(alpha)|
    reptile_residuals: list[float]  # |c_reptile(alpha) + (P/2) grad X_u|


def measure_cross_task(
    tasks: SmoothTasks, p: Sequence[float], inner_steps: int, outer_lr: float
) -> CrossTaskMeasurement:
    num_tasks = tasks.num_tasks
    same_task = [
        torch.func.grad(lambda x, t=t: torch.func.grad(tasks.loss(t))(x).pow(2).sum())(tasks.phi)
        for t in range(num_tasks)
    ]

    def cross_alignment(x: Tensor, q: Sequence[float]) -> Tensor:
        grads = [torch.func.grad(tasks.loss(t))(x) for t in range(num_tasks)]
        pairs = [(a, b) for a in range(num_tasks) for b in range(num_tasks) if a != b]
        return sum(q[a] * q[b] * (grads[a] @ grads[b]) for a, b in pairs)  # type: ignore[return-value]

    pairs = inner_steps * (inner_steps - 1) / 2
    uniform = [1.0 / num_tasks] * num_tasks
    seq_target = -pairs / 2 * torch.func.grad(cross_alignment)(tasks.phi, p)
    reptile_target = -pairs / 2 * torch.func.grad(cross_alignment)(tasks.phi, uniform)
    sequences, weights = all_sequences(num_tasks, inner_steps, p)
    c = taylor_coefficients(tasks, sequences, weights)
    c_reptile = taylor_coefficients(tasks, *reptile_sequences(num_tasks, inner_steps))
    alphas = alpha_grid(inner_steps, tasks.curvature(), c)
    m = CrossTaskMeasurement(
        same_task, seq_target, c, c_reptile, alphas, resolvable(c[2], alphas, tasks, outer_lr),
        [], [], [], [],
    )  # fmt: skip
    if not m.resolvable:
        return m
    w = torch.tensor(weights, dtype=F64)
    rows = torch.tensor(sequences)
    for alpha in alphas:
        mg, _ = run_seqreptile(tasks, rows, alpha, outer_lr)
        correction = (w @ mg / alpha - c[0]) / alpha
        m.seq_residuals.append(float((correction - seq_target).norm()))
        m.seq_intra_only.append(float(correction.norm()))
        mg, _ = run_reptile(tasks, inner_steps, alpha, outer_lr)
        correction = (mg / alpha - c_reptile[0]) / alpha
        m.reptile_correction.append(float(correction.norm()))
        m.reptile_residuals.append(float((correction - reptile_target).norm()))
    return m


# ---------------------------------------------------------------------------- 4. equivalences
class Bundle:
    """Float64 parameters of the given shapes, one never used, and a smooth non-quadratic loss."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
        self.unused = nn.Parameter(torch.ones(3, dtype=F64))  # never gets a gradient
        self.seed = seed

    def all_params(self) -> list[nn.Parameter]:
        return [*self.params, self.unused]

    def loss(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7919 * (step + 1))
        total = torch.zeros((), dtype=F64)
        for p in self.params:
            x = torch.randn(p.shape, generator=gen, dtype=F64)
            y = torch.randn(p.shape, generator=gen, dtype=F64)
            total = total + F.softplus(x * p).sum() + 0.5 * (p - y).pow(2).sum()
        return total

    def train(self, opt: torch.optim.Optimizer, num_steps: int) -> None:
        for step in range(num_steps):
            opt.zero_grad()
            self.loss(step).backward()
            opt.step()


shape_lists = st.lists(
    st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=4
)
EAGER_IMPLS = [impl for impl in OUTER_IMPLS if impl != "compiled"]
impls = st.sampled_from(EAGER_IMPLS)


@st.composite
def sgd_options(draw: st.DrawFn) -> dict[str, float | bool]:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.floats(0.01, 0.2)),
        "momentum": momentum,
        "nesterov": nesterov,
        "dampening": 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.3])),
        "weight_decay": draw(st.sampled_from([0.0, 0.05])),
    }


def assert_same(actual: Sequence[Tensor], expected: Sequence[Tensor], **tol: float) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), **tol)  # type: ignore[arg-type]


@theory_settings(25)
@given(
    shapes=shape_lists,
    seed=st.integers(0, 2**32 - 1),
    inner_steps=st.integers(1, 4),
    num_steps=st.integers(1, 12),
    sgd=sgd_options(),
    impl=impls,
)
def test_outer_lr_one_is_plain_inner_training(
    shapes: list[tuple[int, ...]],
    seed: int,
    inner_steps: int,
    num_steps: int,
    sgd: dict[str, float | bool],
    impl: str,
) -> None:
    """eta = 1: phi <- theta_K, so SeqReptile is the inner optimizer alone, bit for bit
    (lerp(phi, theta, 1) = theta; the SGD momentum buffer is kept across outer steps)."""
    model, plain = Bundle(shapes, seed), Bundle(shapes, seed)
    opt = SeqReptile(torch.optim.SGD(model.all_params(), **sgd), inner_steps, 1.0, outer_impl=impl)  # type: ignore[arg-type]
    model.train(opt, num_steps)
    plain.train(torch.optim.SGD(plain.all_params(), **sgd), num_steps)  # type: ignore[arg-type]
    assert_same(model.all_params(), plain.all_params(), rtol=0, atol=0)


@theory_settings(25)
@given(
    shapes=shape_lists,
    seed=st.integers(0, 2**32 - 1),
    num_steps=st.integers(1, 12),
    sgd=sgd_options(),
    outer_lr=outer_lrs,
    impl=impls,
)
def test_one_inner_step_is_sgd_with_lr_alpha_times_eta(
    shapes: list[tuple[int, ...]],
    seed: int,
    num_steps: int,
    sgd: dict[str, float | bool],
    outer_lr: float,
    impl: str,
) -> None:
    """K = 1: phi <- phi - eta (phi - (phi - alpha d)) = phi - (alpha eta) d, where d is SGD's
    direction (gradient, weight decay, momentum buffer: none depends on the lr), so SeqReptile
    is SGD with lr alpha * eta, to rounding."""
    model, plain = Bundle(shapes, seed), Bundle(shapes, seed)
    opt = SeqReptile(torch.optim.SGD(model.all_params(), **sgd), 1, outer_lr, outer_impl=impl)  # type: ignore[arg-type]
    model.train(opt, num_steps)
    product = {**sgd, "lr": float(sgd["lr"]) * outer_lr}
    plain.train(torch.optim.SGD(plain.all_params(), **product), num_steps)  # type: ignore[arg-type]
    assert_same(model.all_params(), plain.all_params(), rtol=1e-12, atol=1e-12)
    assert_same(
        [slow_by_index(opt)[i] for i in sorted(slow_by_index(opt))],
        plain.params,
        rtol=1e-12,
        atol=1e-12,
    )


@theory_settings(25)
@given(
    shapes=shape_lists,
    seed=st.integers(0, 2**32 - 1),
    inner_steps=st.integers(1, 4),
    num_steps=st.integers(1, 12),
    sgd=sgd_options(),
    outer_lr=outer_lrs,
    outer_momentum=st.sampled_from([0.0, 0.5]),
    nesterov=st.booleans(),
    reset_inner_state=st.booleans(),
    finish=st.booleans(),
    impl=impls,
)
def test_reptile_with_one_task_is_seqreptile(
    shapes: list[tuple[int, ...]],
    seed: int,
    inner_steps: int,
    num_steps: int,
    sgd: dict[str, float | bool],
    outer_lr: float,
    outer_momentum: float,
    nesterov: bool,
    reset_inner_state: bool,
    finish: bool,
    impl: str,
) -> None:
    """T = 1: Eq. 3's mean over one trajectory is its end point, so Reptile is SeqReptile
    (Eq. 6) bit for bit, with outer momentum, inner-state reset and a final partial
    trajectory ended by ``outer_step()``."""
    options = {
        "outer_momentum": outer_momentum,
        "nesterov": nesterov and outer_momentum > 0,
        "reset_inner_state": reset_inner_state,
        "outer_impl": impl,
    }
    a, b = Bundle(shapes, seed), Bundle(shapes, seed)
    seq = SeqReptile(torch.optim.SGD(a.all_params(), **sgd), inner_steps, outer_lr, **options)  # type: ignore[arg-type]
    rep = Reptile(torch.optim.SGD(b.all_params(), **sgd), inner_steps, outer_lr, 1, **options)  # type: ignore[arg-type]
    a.train(seq, num_steps)
    b.train(rep, num_steps)
    if finish:
        seq.outer_step()
        rep.outer_step()
    assert rep.current_task == 0
    assert_same(a.all_params(), b.all_params(), rtol=0, atol=0)
    assert sorted(slow_by_index(seq)) == sorted(slow_by_index(rep))
    assert_same(
        [slow_by_index(seq)[i] for i in sorted(slow_by_index(seq))],
        [slow_by_index(rep)[i] for i in sorted(slow_by_index(rep))],
        rtol=0,
        atol=0,
    )
    assert_same(
        [
            slow_by_index(seq, "outer_momentum_buffer")[i]
            for i in sorted(slow_by_index(seq, "outer_momentum_buffer"))
        ],
        [
            slow_by_index(rep, "outer_momentum_buffer")[i]
            for i in sorted(slow_by_index(rep, "outer_momentum_buffer"))
        ],
        rtol=0,
        atol=0,
    )


def reference_run(
    model: Bundle,
    sgd: dict[str, float | bool],
    inner_steps: int,
    num_steps: int,
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> list[Tensor]:
    """Algorithm 1 written out (lines 3-10), SGD as line 7, optional outer heavy-ball momentum
    on MG (buf <- mu buf + MG; phi <- phi - eta (MG + mu buf if Nesterov else buf)). Returns phi."""
    inner = torch.optim.SGD(model.params, **sgd)  # type: ignore[arg-type]
    phi = [p.detach().clone() for p in model.params]
    buffers = [torch.zeros_like(p) for p in phi]
    for step in range(num_steps):
        inner.zero_grad()
        model.loss(step).backward()
        inner.step()
        if (step + 1) % inner_steps == 0:
            with torch.no_grad():
                for i, theta in enumerate(model.params):
                    meta_grad = phi[i] - theta  # line 9: MG(phi) = phi - theta^(K)
                    buffers[i] = momentum * buffers[i] + meta_grad
                    if momentum == 0:
                        direction = meta_grad
                    else:
                        direction = meta_grad + momentum * buffers[i] if nesterov else buffers[i]
                    phi[i] = phi[i] - outer_lr * direction  # line 10
                    theta.copy_(phi[i])  # line 3: theta^(0) <- phi
    return phi


def run_impl(
    impl: str,
    shapes: list[tuple[int, ...]],
    seed: int,
    sgd: dict[str, float | bool],
    inner_steps: int,
    num_steps: int,
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> tuple[Bundle, SeqReptile]:
    model = Bundle(shapes, seed)
    opt = SeqReptile(
        torch.optim.SGD(model.all_params(), **sgd),  # type: ignore[arg-type]
        inner_steps,
        outer_lr,
        outer_momentum=momentum,
        nesterov=nesterov,
        outer_impl=impl,
    )
    model.train(opt, num_steps)
    return model, opt


@theory_settings(25)
@given(
    shapes=shape_lists,
    seed=st.integers(0, 2**32 - 1),
    inner_steps=st.integers(1, 4),
    num_steps=st.integers(1, 12),
    sgd=sgd_options(),
    outer_lr=outer_lrs,
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
)
def test_outer_update_paths_agree_with_algorithm_1(
    shapes: list[tuple[int, ...]],
    seed: int,
    inner_steps: int,
    num_steps: int,
    sgd: dict[str, float | bool],
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """Every eager outer-update path (``OUTER_IMPLS`` but ``compiled``: foreach, per_tensor)
    gives the phi and theta of the written-out Algorithm 1, to rounding, and the paths agree
    with each other."""
    nesterov = nesterov and momentum > 0
    reference = Bundle(shapes, seed)
    phi = reference_run(reference, sgd, inner_steps, num_steps, outer_lr, momentum, nesterov)
    args = (shapes, seed, sgd, inner_steps, num_steps, outer_lr, momentum, nesterov)
    runs = {impl: run_impl(impl, *args) for impl in EAGER_IMPLS}
    for impl, (model, opt) in runs.items():
        assert_same(model.params, reference.params, rtol=1e-12, atol=1e-12)
        tracked = [slow_by_index(opt).get(i, p) for i, p in enumerate(model.params)]
        assert_same(tracked, phi, rtol=1e-12, atol=1e-12)
        assert len(slow_by_index(opt)) == len(model.params), (
            f"{impl}: the unused parameter got a slow copy"
        )
        base_model, _ = runs["foreach"]
        assert_same(model.all_params(), base_model.all_params(), rtol=1e-14, atol=1e-15)


@pytest.mark.slow
def test_compiled_outer_update_agrees() -> None:
    """The torch.compile path (compiles once, ~10-30 s on CPU) on a tiny model."""
    pytest.importorskip("torch._inductor")
    args = ([(3, 2), (4,)], 0, {"lr": 0.1, "momentum": 0.5}, 2, 7, 0.3, 0.0, False)
    model, opt = run_impl("compiled", *args)  # type: ignore[arg-type]
    base_model, base_opt = run_impl("foreach", *args)  # type: ignore[arg-type]
    reference = Bundle([(3, 2), (4,)], 0)
    phi = reference_run(reference, {"lr": 0.1, "momentum": 0.5}, 2, 7, 0.3, 0.0, False)
    assert_same(model.all_params(), base_model.all_params(), rtol=1e-14, atol=1e-15)
    assert_same(
        [slow_by_index(opt)[i] for i in range(2)],
        [slow_by_index(base_opt)[i] for i in range(2)],
        rtol=1e-14,
        atol=1e-15,
    )
    assert_same(model.params, reference.params, rtol=1e-12, atol=1e-12)
    assert_same([slow_by_index(opt)[i] for i in range(2)], phi, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- the assertion
def test_order_assertion_accepts_only_the_right_rate() -> None:
    """assert_order on synthetic residuals: it accepts c alpha^2 (+ a small alpha^3 term) and
    rejects alpha, a constant, rounding noise ~ 1/alpha and exact zeros."""
    alphas = alpha_grid(3, 1.0)
    a = np.asarray(alphas)
    assert_order(alphas, list(3.0 * a**2 * (1 + 2.0 * a)), 2, "synthetic")
    assert_order(alphas, list(0.5 * a * (1 - 3.0 * a)), 1, "synthetic")
    for wrong in (a, np.ones_like(a), 1e-16 / a, a**3, np.zeros_like(a)):
        assert_rejected(alphas, list(wrong), 2)
