"""Defining invariants of the surgery methods on random gradient matrices, and float64
comparisons with literal transcriptions of each paper's algorithm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torch_seqreptile.surgery import (
    cagrad_weights,
    gradvac_weights,
    min_norm_weights,
    mtl_weights,
    pcgrad_weights,
)
from torch_seqreptile.surgery._base import random_orders

# per-test settings (no global profile change): small example counts keep the file fast
FAST = settings(max_examples=40, deadline=None)


@st.composite
def gradient_matrices(draw: st.DrawFn, min_tasks: int = 1, max_tasks: int = 5) -> np.ndarray:
    """T×D task gradients; zeros, duplicates and T > D (degenerate hulls) all occur."""
    tasks = draw(st.integers(min_tasks, max_tasks))
    dim = draw(st.integers(1, 6))
    values = draw(
        st.lists(
            st.floats(-4, 4, allow_nan=False, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
            min_size=tasks * dim,
            max_size=tasks * dim,
        )
    )
    matrix = np.array(values, dtype=np.float64).reshape(tasks, dim)
    if draw(st.booleans()) and tasks > 1:
        matrix[-1] = matrix[0] * draw(st.sampled_from([1.0, -1.0, 0.5]))
    return matrix


def scale_of(x: np.ndarray) -> float:
    return max(float(np.max(np.sum(x * x, axis=1))), 1e-300)


orders_seeds = st.integers(0, 2**31)


def orders_for(num_tasks: int, seed: int) -> list[list[int]]:
    return random_orders(num_tasks, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- literal transcriptions
def literal_pcgrad(grads: list[torch.Tensor], orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. (2020), Algorithm 1, on explicit vectors."""
    projected = [g.clone() for g in grads]
    for i in range(len(grads)):
        for j in orders[i]:
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (grads[j] @ grads[j]) * grads[j]
    return torch.stack(projected).sum(0)


def literal_gradvac(
    grads: torch.Tensor, blocks: list[slice], targets: torch.Tensor, beta: float, orders
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang et al. (2021), Algorithm 1, per block, as the authors' per-layer loop."""
    pc = grads.clone()
    targets = targets.clone()
    for i in range(len(grads)):
        for j in orders[i]:
            for k, sl in enumerate(blocks):
                gi, gj = pc[i, sl], grads[j, sl]
                if gi.norm() == 0 or gj.norm() == 0:
                    continue
                phi = (gi @ gj) / (gi.norm() * gj.norm())
                goal = targets[k, i, j]
                if phi < goal:
                    coef = (
                        gi.norm()
                        * (goal * (1 - phi**2).sqrt() - phi * (1 - goal**2).sqrt())
                        / (gj.norm() * (1 - goal**2).sqrt())
                    )
                    pc[i, sl] = gi + coef * gj
                targets[k, i, j] = (1 - beta) * goal + beta * phi
    return pc.sum(0), targets


def literal_mgda_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Sener & Koltun (2018), Algorithm 1: min over gamma of ||gamma g1 + (1-gamma) g2||."""
    if g1 @ g2 >= g1 @ g1:
        gamma = 1.0
    elif g1 @ g2 >= g2 @ g2:
        gamma = 0.0
    else:
        gamma = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))
    return gamma * g1 + (1 - gamma) * g2


def literal_mgda_frank_wolfe(grads: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Sener & Koltun (2018), Algorithm 2 (Frank-Wolfe with the line search of Alg. 1)."""
    alpha = torch.full((len(grads),), 1.0 / len(grads), dtype=torch.float64)
    gram = grads @ grads.T
    for _ in range(iterations):
        t_hat = int(torch.argmin(gram @ alpha))
        theta = alpha @ grads
        gamma_point = literal_mgda_two(grads[t_hat], theta)  # = gamma g_t + (1-gamma) theta
        diff = grads[t_hat] - theta
        gamma = 0.0 if diff.norm() == 0 else float((gamma_point - theta) @ diff / (diff @ diff))
        alpha = (1 - gamma) * alpha
        alpha[t_hat] += gamma
    return alpha @ grads


# ---------------------------------------------------------------- MTL
@FAST
@given(gradient_matrices(), st.data())
def test_order_independent_methods_ignore_task_permutations(x: np.ndarray, data) -> None:
    perm = np.array(data.draw(st.permutations(range(len(x)))))
    c = data.draw(st.sampled_from([0.0, 0.4, 1.5]))
    tol = 1e-7 * math.sqrt(scale_of(x)) * len(x)
    for fn in (mtl_weights, min_norm_weights, lambda g: cagrad_weights(g, c)):
        d = fn(x @ x.T) @ x
        xp = x[perm]
        dp = fn(xp @ xp.T) @ xp
        np.testing.assert_allclose(dp, d, atol=tol, rtol=1e-7)


@FAST
@given(gradient_matrices())
def test_mtl_is_the_sum(x: np.ndarray) -> None:
    # the weights are exactly one; the combination equals the sum up to the summation
    # order of the matrix product (x = [1e-12, 1, -1, 1e-12] cancels differently)
    np.testing.assert_array_equal(mtl_weights(x @ x.T), np.ones(len(x)))
    tol = 4 * np.finfo(float).eps * np.abs(x).sum(0)
    np.testing.assert_allclose(mtl_weights(x @ x.T) @ x, x.sum(0), rtol=0, atol=tol.max())


# ---------------------------------------------------------------- PCGrad
@FAST
@given(gradient_matrices(min_tasks=2, max_tasks=2), orders_seeds)
def test_pcgrad_two_tasks_never_conflicts(x: np.ndarray, seed: int) -> None:
    d = pcgrad_weights(x @ x.T, orders_for(2, seed)) @ x
    tol = 1e-9 * scale_of(x)
    assert d @ x[0] >= -tol
    assert d @ x[1] >= -tol


@FAST
@given(gradient_matrices(), orders_seeds)
def test_pcgrad_matches_literal_algorithm(x: np.ndarray, seed: int) -> None:
    orders = orders_for(len(x), seed)
    expected = literal_pcgrad(list(torch.from_numpy(x)), orders).numpy()
    got = pcgrad_weights(x @ x.T, orders) @ x
    np.testing.assert_allclose(got, expected, atol=1e-8 * math.sqrt(scale_of(x)), rtol=1e-8)


# ---------------------------------------------------------------- MGDA
@FAST
@given(gradient_matrices())
def test_mgda_is_min_norm_point_of_hull(x: np.ndarray) -> None:
    w = min_norm_weights(x @ x.T)
    assert np.all(w >= 0) and math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    d = w @ x
    tol = 1e-9 * scale_of(x)
    for g in x:  # optimality of the min-norm point: <d, g_t> >= ||d||^2 for every t
        assert d @ g >= d @ d - tol


@FAST
@given(gradient_matrices(min_tasks=2, max_tasks=2))
def test_mgda_two_tasks_matches_algorithm_1(x: np.ndarray) -> None:
    g = torch.from_numpy(x)
    expected = literal_mgda_two(g[0], g[1]).numpy()
    got = min_norm_weights(x @ x.T) @ x
    np.testing.assert_allclose(got, expected, atol=1e-7 * math.sqrt(scale_of(x)))


@settings(max_examples=15, deadline=None)
@given(gradient_matrices(min_tasks=3, max_tasks=5))
def test_mgda_is_at_least_as_good_as_frank_wolfe(x: np.ndarray) -> None:
    fw = literal_mgda_frank_wolfe(torch.from_numpy(x)).numpy()
    d = min_norm_weights(x @ x.T) @ x
    tol = 1e-9 * scale_of(x)
    assert d @ d <= fw @ fw + tol
    # strong convexity: every hull point q has ||q - d||^2 <= ||q||^2 - ||d||^2
    assert (fw - d) @ (fw - d) <= fw @ fw - d @ d + tol


# ---------------------------------------------------------------- CAGrad
@FAST
@given(gradient_matrices())
def test_cagrad_with_c_zero_is_the_mean(x: np.ndarray) -> None:
    for rescale in (0, 1, 2):
        np.testing.assert_array_equal(
            cagrad_weights(x @ x.T, 0.0, rescale), np.full(len(x), 1.0 / len(x))
        )


def hull_contains_zero(x: np.ndarray) -> bool:
    d = min_norm_weights(x @ x.T) @ x
    return bool(d @ d <= 1e-10 * scale_of(x))


@FAST
@given(gradient_matrices(min_tasks=2), st.sampled_from([0.2, 0.5, 0.9, 2.0]))
def test_cagrad_is_conflict_averse_optimum(x: np.ndarray, c: float) -> None:
    """d = g0 + r u maximises min_t <g_t, d> over the ball ||d - g0|| <= c ||g0|| (Eq. 4).

    Excluded: 0 in the hull of the gradients, where d is not unique (documented fallback g0).
    """
    if hull_contains_zero(x):
        return
    d = cagrad_weights(x @ x.T, c, rescale=0) @ x
    g0 = x.mean(0)
    radius = c * np.linalg.norm(g0)
    tol = 1e-7 * scale_of(x)
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-9) + 1e-12
    worst = min(d @ g for g in x)
    rng = np.random.default_rng(0)
    for _ in range(200):  # no feasible direction does better on the worst task
        u = rng.normal(size=x.shape[1])
        e = g0 + radius * rng.uniform() ** 0.5 * u / np.linalg.norm(u)
        assert min(e @ g for g in x) <= worst + tol


@settings(max_examples=20, deadline=None)
@given(gradient_matrices(min_tasks=2, max_tasks=4), st.sampled_from([0.3, 0.5, 1.0]))
def test_cagrad_matches_authors_solver(x: np.ndarray, c: float) -> None:
    """Algorithm 1 transcribed from the authors' code (scipy SLSQP on the simplex, line 4)."""
    optimize = pytest.importorskip("scipy.optimize")
    num_tasks = len(x)
    gram = x @ x.T
    b = np.ones(num_tasks) / num_tasks
    r = c * math.sqrt(max(b @ gram @ b, 0.0))
    if r == 0 or hull_contains_zero(x):
        return

    def objective(w: np.ndarray) -> float:
        return float(w @ gram @ b + r * math.sqrt(max(w @ gram @ w, 0) + 1e-20))

    res = optimize.minimize(
        objective,
        b,
        bounds=[(0, 1)] * num_tasks,
        constraints={"type": "eq", "fun": lambda w: 1 - w.sum()},
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    gw = res.x @ x
    d_ref = x.mean(0) + r * gw / np.linalg.norm(gw)
    d = cagrad_weights(gram, c, rescale=0) @ x
    tol = 1e-7 * scale_of(x)
    assert min(d @ g for g in x) >= min(d_ref @ g for g in x) - tol
    np.testing.assert_allclose(d, d_ref, atol=1e-3 * math.sqrt(scale_of(x)))


# ---------------------------------------------------------------- GradVac
@FAST
@given(gradient_matrices(min_tasks=2), orders_seeds, st.sampled_from([0.0, 0.01, 0.5]), st.data())
def test_gradvac_leaves_gradients_above_target_unchanged(x, seed, beta, data) -> None:
    num_tasks = len(x)
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.nan_to_num((x @ x.T) / np.outer(norms, norms))  # zero pairs are skipped
    margin = data.draw(st.floats(1e-6, 1.0))
    targets = cosines - margin  # every cosine already exceeds its target
    w, _new = gradvac_weights(x @ x.T, targets, beta, orders_for(num_tasks, seed))
    np.testing.assert_array_equal(w, np.ones(num_tasks))


@FAST
@given(gradient_matrices(min_tasks=2, max_tasks=2), st.floats(-0.9, 0.9))
def test_gradvac_two_tasks_reaches_the_target(x: np.ndarray, goal: float) -> None:
    targets = np.full((2, 2), goal)
    norms = np.linalg.norm(x, axis=1)
    if min(norms) < 1e-3:
        return
    cos = x[0] @ x[1] / (norms[0] * norms[1])
    if abs(cos) > 1 - 1e-9:  # (anti)parallel: the rotation plane of Alg. 1 line 6 is undefined
        return
    if cos < goal - 1e-6:  # g_0 was moved so that cos(g_0', g_1) is exactly the target
        w0, _ = gradvac_weights(x @ x.T, targets, 0.0, [[1], []])  # only task 0 is moved
        g0_new = w0 @ x - x[1]
        assert math.isclose(g0_new @ x[1] / (np.linalg.norm(g0_new) * norms[1]), goal, abs_tol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda t: st.lists(st.floats(-4, 4, width=32), min_size=6 * t, max_size=6 * t).map(
            lambda v: np.array(v, dtype=np.float64).reshape(t, 6)
        )
    ),
    orders_seeds,
    st.floats(0, 1),
)
def test_gradvac_matches_literal_per_layer(x: np.ndarray, seed: int, beta: float) -> None:
    num_tasks, dim = x.shape
    cut = dim // 2
    blocks = [slice(0, cut), slice(cut, dim)]
    for sl in blocks:  # (anti)parallel pairs make line 6 degenerate (g_i' can vanish)
        xs = x[:, sl]
        norms = np.linalg.norm(xs, axis=1)
        for i in range(num_tasks):
            for j in range(num_tasks):
                if i != j and norms[i] > 0 and norms[j] > 0:
                    assume(abs(xs[i] @ xs[j]) < (1 - 1e-6) * norms[i] * norms[j])
    rng = np.random.default_rng(seed)
    targets = rng.uniform(-0.5, 0.9, size=(2, num_tasks, num_tasks))
    orders = orders_for(num_tasks, seed)
    expected, expected_targets = literal_gradvac(
        torch.from_numpy(x), blocks, torch.from_numpy(targets), beta, orders
    )
    got = np.zeros(dim)
    for k, sl in enumerate(blocks):
        xs = x[:, sl]
        if xs.size == 0:
            continue
        w, new = gradvac_weights(xs @ xs.T, targets[k], beta, orders)
        got[sl] = w @ xs
        mask = ~np.eye(num_tasks, dtype=bool)
        np.testing.assert_allclose(new[mask], expected_targets[k].numpy()[mask], atol=1e-8)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6 * math.sqrt(scale_of(x)))


# ---------------------------------------------------------------- one task
@FAST
@given(gradient_matrices(min_tasks=1, max_tasks=1), orders_seeds)
def test_one_task_combinations_are_the_task_gradient_up_to_scale(x: np.ndarray, seed) -> None:
    gram = x @ x.T
    orders = orders_for(1, seed)
    for w in (
        mtl_weights(gram),
        pcgrad_weights(gram, orders),
        gradvac_weights(gram, np.zeros((1, 1)), 0.1, orders)[0],
        min_norm_weights(gram),
        cagrad_weights(gram, 0.5, rescale=0) / 1.5,
    ):
        np.testing.assert_allclose(w @ x, x[0], atol=1e-12)
