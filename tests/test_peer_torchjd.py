"""Peer comparison with torchjd (a test-only dependency) on random Gramians at every scale.

torchjd implements five of our weightings on the Gramian too: Sum (MTL), PCGrad, GradVac,
MGDA (Frank–Wolfe, approximate) and CAGrad (cvxpy's CLARABEL). Where both are exact they
must agree to rounding; against the approximate MGDA ours must be at least as good.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_surgery_scale import hull_contains_zero, largest_sq_norm, scaled_gradients
from torch_seqreptile.surgery import (
    cagrad_weights,
    gradvac_weights,
    min_norm_weights,
    mtl_weights,
    pcgrad_weights,
)
from torch_seqreptile.surgery._base import random_orders

aggregation = pytest.importorskip("torchjd.aggregation")

PEERS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31)


def theirs(weighting, gram: np.ndarray) -> np.ndarray:
    return weighting(torch.from_numpy(gram)).numpy()


@PEERS
@given(scaled_gradients())
def test_mtl_is_torchjd_sum(x: np.ndarray) -> None:
    gram = x @ x.T
    np.testing.assert_array_equal(mtl_weights(gram), theirs(aggregation.SumWeighting(), gram))


@PEERS
@given(scaled_gradients(), seeds)
def test_pcgrad_equals_torchjd_with_the_same_random_order(x: np.ndarray, seed: int) -> None:
    # torchjd draws randperm(T) per task from the global generator, we from our own: seeded
    # alike, both visit the other tasks in the same order
    gram = x @ x.T
    ours = pcgrad_weights(gram, random_orders(len(x), torch.Generator().manual_seed(seed)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peer = theirs(aggregation.PCGradWeighting(), gram)
    assert np.all(np.isfinite(ours))
    if np.all(np.isfinite(peer)):  # theirs divides by a squared norm that underflowed to 0
        np.testing.assert_allclose(ours, peer, rtol=1e-10, atol=1e-10)


def torchjd_gradvac_orders(num_tasks: int) -> list[list[int]]:
    """The orders torchjd's GradVac draws: randperm(T - 1) over the other tasks, per task."""
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        orders.append([others[k] for k in torch.randperm(len(others)).tolist()])
    return orders


@PEERS
@given(scaled_gradients(kinds=("none",)), seeds, st.sampled_from([0.01, 0.5, 1.0]))
def test_gradvac_equals_torchjd_over_two_calls(x: np.ndarray, seed: int, beta: float) -> None:
    """Two successive calls, so the EMA targets of the first are used by the second.

    Compared on pairs that are neither zero nor (nearly) (anti)parallel: there Alg. 1 line 6
    turns g_i' into 0 up to rounding, and the cosines of that residue are not defined.
    """
    gram = x @ x.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = gram / np.outer(norms, norms)
    off = ~np.eye(len(x), dtype=bool)
    # near-(anti)parallel pairs make line 6 ill-conditioned: both sides then carry rounding
    # errors well above 1e-9 (a 13-task case in 2-D: ours 4e-8, theirs 2e-7 from 50 digits)
    if not (norms.min() > 1e-100 * norms.max() and np.all(np.abs(cosines[off]) < 1 - 1e-3)):
        return
    peer = aggregation.GradVacWeighting(beta=beta, eps=0.0)  # eps=0: theirs adds 1e-8 else
    targets = np.zeros((len(x), len(x)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(2):
            state = torch.get_rng_state()
            orders = torchjd_gradvac_orders(len(x))
            torch.set_rng_state(state)
            peer_weights = theirs(peer, gram * (step + 1))
            ours, targets = gradvac_weights(gram * (step + 1), targets, beta, orders)
            assert np.all(np.isfinite(ours)) and np.all(np.isfinite(targets))
            if not np.all(np.isfinite(peer_weights)):
                # with eps=0 torchjd divides 0/0 on a zero or (anti)parallel pair, which we
                # skip (Alg. 1 line 6 is undefined there); its eps=1e-8 is not scale-free
                return
            np.testing.assert_allclose(ours, peer_weights, rtol=1e-8, atol=1e-8)
            peer_targets = peer._phi_t.numpy()
            if not np.all(np.isfinite(peer_targets[off])):  # their 0/0 pairs: NaN targets
                return
            np.testing.assert_allclose(targets[off], peer_targets[off], atol=1e-9)


@PEERS
@given(scaled_gradients())
def test_mgda_at_least_as_good_as_torchjd_frank_wolfe(x: np.ndarray) -> None:
    gram = x @ x.T
    ours = min_norm_weights(gram) @ x
    peer = theirs(aggregation.MGDAWeighting(epsilon=1e-6, max_iters=2000), gram) @ x
    slack = 1e-9 * largest_sq_norm(x)
    assert ours @ ours <= peer @ peer + slack
    # strong convexity: every hull point q has ||q - d*||^2 <= ||q||^2 - ||d*||^2
    assert (peer - ours) @ (peer - ours) <= peer @ peer - ours @ ours + slack


@settings(max_examples=15, deadline=None)
@given(scaled_gradients(max_tasks=8), st.sampled_from([0.1, 0.4, 0.5, 1.0]))
def test_cagrad_agrees_with_torchjd(x: np.ndarray, c: float) -> None:
    """Same problem (Alg. 1, no rescale), their conic solver vs our closed form."""
    pytest.importorskip("cvxpy")
    gram = x @ x.T
    if hull_contains_zero(x):  # d is not unique there (their fallback is 0, ours g_0)
        return
    ours = cagrad_weights(gram, c, rescale=0) @ x
    peer = theirs(aggregation.CAGradWeighting(c=c, norm_eps=0.0), gram) @ x
    scale = largest_sq_norm(x)
    worst_ours, worst_peer = min(ours @ g for g in x), min(peer @ g for g in x)
    assert worst_ours >= worst_peer - 1e-6 * scale  # ours is the optimum of Eq. 4
    np.testing.assert_allclose(ours, peer, rtol=0, atol=1e-3 * math.sqrt(scale))
