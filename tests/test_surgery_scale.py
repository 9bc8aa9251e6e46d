"""The weightings at every gradient scale real training produces (1e-8 to 1e8, e.g. a
GradScaler's 2**16) and on degenerate task gradients, for 2 to 16 tasks.

Each property is a mathematical invariant of the method, checked on random gradients
``x`` (T × D) whose Gramian ``x xᵀ`` is what the optimizers solve on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_seqreptile.surgery import (
    cagrad_weights,
    gradnorm_weight_grad,
    gradvac_weights,
    min_norm_weights,
    mtl_weights,
    pcgrad_coefficients,
    pcgrad_weights,
)
from torch_seqreptile.surgery._base import random_orders

SCALES = settings(max_examples=60, deadline=None)
DEGENERATE = ("none", "identical", "opposite", "zero", "collinear", "all_identical")


@st.composite
def scaled_gradients(
    draw: st.DrawFn, min_tasks: int = 2, max_tasks: int = 16, kinds: tuple[str, ...] = DEGENERATE
) -> np.ndarray:
    """T task gradients of norm about 10**e, e in [-8, 8], some of them degenerate."""
    tasks = draw(st.integers(min_tasks, max_tasks))
    dim = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    exponent = draw(st.floats(-8.0, 8.0))
    x = np.random.default_rng(seed).normal(size=(tasks, dim)) * 10.0**exponent
    kind = draw(st.sampled_from(kinds))
    if kind == "identical":
        x[-1] = x[0]
    elif kind == "opposite":
        x[-1] = -x[0]
    elif kind == "zero":
        x[-1] = 0.0
    elif kind == "collinear":
        x[1:] = x[0] * draw(st.floats(-3.0, 3.0))
    elif kind == "all_identical":
        x[:] = x[0]
    return x


def largest_sq_norm(x: np.ndarray) -> float:
    return float(np.max(np.sum(x * x, axis=1)))


def hull_contains_zero(x: np.ndarray) -> bool:
    d = min_norm_weights(x @ x.T) @ x
    return bool(d @ d <= 1e-10 * largest_sq_norm(x))


factors = st.floats(-8.0, 8.0).map(lambda e: 10.0**e)
orders_seeds = st.integers(0, 2**31)


def orders_for(num_tasks: int, seed: int) -> list[list[int]]:
    return random_orders(num_tasks, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- scale invariance
@SCALES
@given(scaled_gradients(), factors, orders_seeds, st.sampled_from([0.1, 0.5, 2.0]))
def test_combination_is_invariant_under_gradient_scaling(x, factor, seed, c) -> None:
    """G -> cG (gradients times sqrt(c)) leaves every method's combination direction alone."""
    gram = x @ x.T
    orders = orders_for(len(x), seed)
    targets = np.full((len(x), len(x)), 0.3)
    methods = {
        "mtl": lambda g: mtl_weights(g),
        "pcgrad": lambda g: pcgrad_weights(g, orders),
        "gradvac": lambda g: gradvac_weights(g, targets, 0.1, orders)[0],
        "mgda": lambda g: min_norm_weights(g),  # the min-norm point is unique, weights may not be
    }
    if not hull_contains_zero(x):  # else CAGrad's d is not unique (documented fallback g_0)
        methods["cagrad"] = lambda g: cagrad_weights(g, c)
    tol = 1e-7 * math.sqrt(largest_sq_norm(x))
    for name, weights in methods.items():
        w, w_scaled = weights(gram), weights(gram * factor)
        assert np.all(np.isfinite(w_scaled)), name
        np.testing.assert_allclose(w_scaled @ x, w @ x, rtol=0, atol=tol, err_msg=name)


# ---------------------------------------------------------------- MGDA
@SCALES
@given(scaled_gradients())
def test_mgda_min_norm_optimality_at_every_scale(x: np.ndarray) -> None:
    """w on the simplex and <d, g_t> >= ||d||^2 for every t (the min-norm point's KKT)."""
    w = min_norm_weights(x @ x.T)
    assert np.all(np.isfinite(w)) and np.all(w >= 0.0)
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    d = w @ x
    slack = 1e-9 * largest_sq_norm(x)
    for g in x:
        assert d @ g >= d @ d - slack


@SCALES
@given(st.integers(2, 16), st.integers(0, 2**32 - 1), st.floats(-8.0, -2.0), factors)
def test_mgda_on_clusters_of_near_duplicate_gradients(tasks, seed, spread, scale) -> None:
    """Two clusters of gradients that agree to delta = 10**spread: the Gramian separates
    them only to first order in delta, the documented bound of the optimality condition."""
    rng = np.random.default_rng(seed)
    delta = 10.0**spread
    centres = rng.normal(size=(2, 12))
    x = (centres[np.arange(tasks) % 2] + delta * rng.normal(size=(tasks, 12))) * math.sqrt(scale)
    w = min_norm_weights(x @ x.T)
    assert np.all(np.isfinite(w)) and np.all(w >= 0.0)
    d = w @ x
    slack = (1e-11 + delta) * largest_sq_norm(x)
    assert min(d @ g for g in x) >= d @ d - slack


def test_mgda_is_not_zero_under_a_grad_scaler() -> None:
    """The reported failure: norms about 1e4 (a GradScaler's 2**16) gave all-zero weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 50)) * 2.0**16
    w = min_norm_weights(x @ x.T)
    np.testing.assert_allclose(w, min_norm_weights((x / 2.0**16) @ (x / 2.0**16).T), atol=1e-12)
    assert math.isclose(w.sum(), 1.0) and np.linalg.norm(w @ x) > 0


# ---------------------------------------------------------------- CAGrad
@SCALES
@given(scaled_gradients(), st.sampled_from([0.1, 0.4, 0.5, 1.0, 2.0]))
def test_cagrad_ball_constraint_and_zero_duality_gap(x: np.ndarray, c: float) -> None:
    """||d - g0|| <= c||g0||, and d attains the dual bound min_w g_w·g0 + r||g_w|| (Eq. 4)."""
    num_tasks = len(x)
    coef = cagrad_weights(x @ x.T, c, rescale=0)
    assert np.all(np.isfinite(coef))
    g0, d = x.mean(0), coef @ x
    radius = c * np.linalg.norm(g0)
    scale = largest_sq_norm(x)
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-9) + 1e-12 * math.sqrt(scale)
    if hull_contains_zero(x) or radius == 0.0:
        return
    w = coef - 1.0 / num_tasks  # = (r / ||g_w||) w*, on the simplex up to that factor
    assert np.all(w >= -1e-12) and w.sum() > 0
    g_w = (w / w.sum()) @ x
    dual = g_w @ g0 + radius * np.linalg.norm(g_w)  # >= the optimum >= the primal value
    primal = min(d @ g for g in x)
    assert dual - primal <= 1e-7 * scale


# ---------------------------------------------------------------- PCGrad
@SCALES
@given(scaled_gradients(), orders_seeds)
def test_pcgrad_projection_identities(x: np.ndarray, seed: int) -> None:
    """After its last projection, g_i^PC is orthogonal to that g_j; projections never grow it."""
    gram = x @ x.T
    orders = orders_for(len(x), seed)
    coef = pcgrad_coefficients(gram, orders)
    projected = coef @ x
    scale = largest_sq_norm(x)
    for i, order in enumerate(orders):
        current = np.eye(len(x))[i]
        last = None
        for j in order:  # replay which projections fire (Algorithm 1, line 5)
            dot = current @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                current = current - dot / gram[j, j] * np.eye(len(x))[j]
                last = j
        np.testing.assert_allclose(coef[i], current, rtol=1e-12, atol=1e-12)
        assert projected[i] @ projected[i] <= x[i] @ x[i] * (1 + 1e-9) + 1e-12 * scale
        if last is not None:
            assert abs(projected[i] @ x[last]) <= 1e-9 * scale
    np.testing.assert_allclose(pcgrad_weights(gram, orders), coef.sum(0), rtol=0, atol=0)


@SCALES
@given(scaled_gradients(min_tasks=2, max_tasks=2), orders_seeds)
def test_pcgrad_two_tasks_never_conflict_at_every_scale(x: np.ndarray, seed: int) -> None:
    d = pcgrad_weights(x @ x.T, orders_for(2, seed)) @ x
    slack = 1e-9 * largest_sq_norm(x)
    assert d @ x[0] >= -slack and d @ x[1] >= -slack


# ---------------------------------------------------------------- GradVac, GradNorm
@SCALES
@given(scaled_gradients(), orders_seeds, st.floats(-0.9, 0.9))
def test_gradvac_finite_with_targets_in_range(x, seed, goal) -> None:
    targets = np.full((len(x), len(x)), goal)
    w, new = gradvac_weights(x @ x.T, targets, 0.5, orders_for(len(x), seed))
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(new))
    assert np.all(np.abs(new) <= 1.0)


@SCALES
@given(scaled_gradients(), st.floats(0.0, 3.0), st.integers(0, 2**32 - 1))
def test_gradnorm_weight_gradient_finite_and_scales_with_the_norms(x, alpha, seed) -> None:
    """Zero losses (a solved task) included; the weight gradient is linear in the norms."""
    rng = np.random.default_rng(seed)
    losses = rng.uniform(0.0, 2.0, size=len(x)) * rng.integers(0, 2, size=len(x))
    if losses.sum() == 0:
        losses[0] = 1.0
    initial = rng.uniform(0.5, 2.0, size=len(x))
    norms = np.linalg.norm(x, axis=1)
    weights = rng.uniform(0.5, 1.5, size=len(x))
    grad = gradnorm_weight_grad(weights, norms, losses, initial, alpha)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        gradnorm_weight_grad(weights, 3.0 * norms, losses, initial, alpha), 3.0 * grad, rtol=1e-12
    )
