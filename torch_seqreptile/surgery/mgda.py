"""MGDA: the min-norm point of the convex hull of task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import numpy as np

from torch_seqreptile.surgery._base import Array, GradientCombiner

_TOL = 1e-12


def _affine_min(gram: Array) -> Array:
    """Weights (summing to 1) of the min-norm point of the affine hull of the points."""
    size = gram.shape[0]
    kkt = np.zeros((size + 1, size + 1))
    kkt[:size, :size] = gram
    kkt[:size, size] = 1.0
    kkt[size, :size] = 1.0
    rhs = np.zeros(size + 1)
    rhs[size] = 1.0
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return np.asarray(solution[:size], dtype=np.float64)


def min_norm_weights(gram: Array, max_iter: int = 1000) -> Array:
    r"""``argmin_{w in simplex} wᵀ G w``, exactly, by Wolfe's min-norm-point algorithm.

    Wolfe (1976), "Finding the nearest point in a polytope", run on the Gramian only. The
    result d = sum_t w_t g_t satisfies the optimality condition of the min-norm point,
    :math:`\langle d, g_t\rangle \ge \|d\|^2` for every t, to rounding (relative 1e-12). It
    solves the same problem as Sener & Koltun's Frank–Wolfe solver (their Algorithm 2), but
    terminates with the exact point instead of approaching it.
    """
    num_tasks = gram.shape[0]
    scale = max(float(np.max(np.diag(gram))), np.finfo(np.float64).tiny)
    first = int(np.argmin(np.diag(gram)))
    corral = [first]
    lam = np.ones(1)
    for _ in range(max_iter):
        dots = gram[:, corral] @ lam  # <x, g_j> for every j
        norm_sq = float(lam @ dots[corral])
        j = int(np.argmin(dots))
        if norm_sq - dots[j] <= _TOL * scale or j in corral:  # major cycle: x is optimal
            break
        corral.append(j)
        lam = np.append(lam, 0.0)
        for _ in range(max_iter):  # minor cycle: move to the affine minimiser, dropping points
            mu = _affine_min(gram[np.ix_(corral, corral)])
            if np.all(mu > _TOL):
                lam = mu
                break
            shrinking = mu < lam
            ratios = lam[shrinking] / (lam[shrinking] - mu[shrinking])
            theta = float(np.min(ratios[mu[shrinking] <= _TOL])) if np.any(shrinking) else 1.0
            lam = lam + min(theta, 1.0) * (mu - lam)
            keep = lam > _TOL
            corral = [c for c, k in zip(corral, keep) if k]
            lam = lam[keep] / lam[keep].sum()
    weights = np.zeros(num_tasks)
    weights[corral] = lam
    return weights


class MGDA(GradientCombiner):
    r"""MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", 2018).

    The shared parameters get the min-norm element of the convex hull of the task gradients,
    :math:`d = \sum_t \alpha_t g_t` with
    :math:`\alpha = \arg\min_{\alpha \in \Delta} \|\sum_t \alpha_t g_t\|^2` (their Eq. 3 and
    Algorithm 2, MGDA on the shared parameters ``theta^sh``); task-specific parameters get
    their task's plain gradient (Algorithm 2, first loop). The problem is solved exactly on the
    T×T Gramian by Wolfe's algorithm (:func:`min_norm_weights`). No gradient normalisation
    (their code's ``"l2"``/``"loss"`` options) is applied; d is on the scale of one task
    gradient (weights sum to 1), not of their sum.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
    """

    def _weights(self, grams: Array, active: list[int], losses: Array) -> Array:
        return min_norm_weights(grams[0])[None, :]
