"""MGDA: the min-norm point of the convex hull of task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import numpy as np

from torch_seqreptile.surgery._base import Array, GramianCombiner, TaskGramians, normalized_gramian

#: Wolfe's optimality tolerance, relative to the largest squared task-gradient norm
_TOL = 1e-12


def _affine_min(gram: Array) -> Array:
    r"""Weights (summing to 1) of the min-norm point of the affine hull of the points.

    The KKT system :math:`\begin{pmatrix}G & 1\\ 1^\top & 0\end{pmatrix}
    \binom{\mu}{-\nu} = \binom{0}{1}` on a normalised Gramian (entries at most 1, so the
    two blocks are on one scale); least squares if the points are affinely dependent.
    """
    size = gram.shape[0]
    kkt = np.zeros((size + 1, size + 1))
    kkt[:size, :size] = gram
    kkt[:size, size] = 1.0
    kkt[size, :size] = 1.0
    rhs = np.zeros(size + 1)
    rhs[size] = 1.0
    try:
        solution = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        solution = None
    if solution is None or not np.all(np.isfinite(solution)):
        solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return np.asarray(solution[:size], dtype=np.float64)


def min_norm_weights(gram: Array, max_iter: int = 1000) -> Array:
    r"""``argmin_{w in simplex} wᵀ G w``, exactly, by Wolfe's min-norm-point algorithm.

    Wolfe (1976), "Finding the nearest point in a polytope", run on the Gramian only. The
    result d = sum_t w_t g_t satisfies the optimality condition of the min-norm point,
    :math:`\langle d, g_t\rangle \ge \|d\|^2 - \epsilon\max_s \|g_s\|^2` for every t, with
    :math:`\epsilon = 10^{-12}` on well-separated gradients; gradients that agree to
    :math:`\delta` relative (clusters of near-duplicates) are separated in the Gramian only
    to first order in :math:`\delta`, which bounds :math:`\epsilon` by about
    :math:`\delta/10` (measured: 4e-9 at :math:`\delta` = 2e-8). It solves
    the problem of Sener & Koltun's Frank–Wolfe solver (their Algorithm 2), but terminates
    with the exact point instead of approaching it.

    Scale-invariant: it runs on :math:`G/\max_t G_{tt}` (``normalized_gramian``), so the
    weights of :math:`cG` are those of G for every c > 0; all-zero gradients give uniform
    weights (every point of the hull is then 0).
    """
    num_tasks = gram.shape[0]
    normalized = normalized_gramian(gram)
    if normalized is None:
        return np.full(num_tasks, 1.0 / num_tasks)
    gram = normalized
    corral = [int(np.argmin(np.diag(gram)))]
    lam = np.ones(1)
    best_norm = float(gram[corral[0], corral[0]])
    for _ in range(max_iter):
        dots = gram[:, corral] @ lam  # <x, g_j> for every j
        j = int(np.argmin(dots))
        if best_norm - dots[j] <= _TOL or j in corral:  # major cycle: x is optimal
            break
        trial, trial_lam = [*corral, j], np.append(lam, 0.0)
        for _ in range(len(trial)):  # minor cycle: toward the affine minimiser, dropping points
            mu = _affine_min(gram[np.ix_(trial, trial)])
            if np.all(mu > 0.0):
                trial_lam = mu
                break
            # step from lam toward mu until the first coordinate with mu <= 0 reaches 0
            falling = np.flatnonzero(mu <= 0.0)
            gaps = trial_lam[falling] - mu[falling]
            ratios = np.where(gaps > 0.0, trial_lam[falling] / np.where(gaps > 0.0, gaps, 1.0), 0.0)
            first = int(np.argmin(ratios))
            theta = min(float(ratios[first]), 1.0)
            trial_lam = trial_lam + theta * (mu - trial_lam)
            trial_lam[falling[first]] = 0.0  # the point that reached 0 leaves the corral
            keep = trial_lam > 0.0
            trial = [c for c, k in zip(trial, keep) if k]
            trial_lam = trial_lam[keep] / trial_lam[keep].sum()
        norm = float(trial_lam @ gram[np.ix_(trial, trial)] @ trial_lam)
        if not norm < best_norm:  # rounding stalled Wolfe's strict decrease: x is optimal
            break
        corral, lam, best_norm = trial, trial_lam, norm
    weights = np.zeros(num_tasks)
    weights[corral] = lam
    return weights


class MGDA(GramianCombiner):
    r"""MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", 2018).

    The shared parameters get the min-norm element of the convex hull of the task gradients,
    :math:`d = \sum_t \alpha_t g_t` with
    :math:`\alpha = \arg\min_{\alpha \in \Delta} \|\sum_t \alpha_t g_t\|^2` (their Eq. 3 and
    Algorithm 2, MGDA on the shared parameters ``theta^sh``); task-specific parameters get
    their task's plain gradient (Algorithm 2, first loop). The problem is solved exactly on the
    T×T Gramian by Wolfe's algorithm (:func:`min_norm_weights`), invariant to the gradients'
    scale. No gradient normalisation (their code's ``"l2"``/``"loss"`` options) is applied; d
    is on the scale of one task gradient (weights sum to 1), not of their sum.

    Example (the min-norm point of the segment from :math:`(1, 0)` to :math:`(-1, 1)`):

        >>> import torch
        >>> from torch_seqreptile.surgery import MGDA
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = MGDA(torch.optim.SGD([w], lr=0.1))
        >>> opt.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])])
        >>> [round(v, 6) for v in w.grad.tolist()], [round(a, 6) for a in opt.last_weights[0].tolist()]
        ([0.2, 0.4], [0.6, 0.4])

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        error_if_nonfinite: see :class:`~torch_seqreptile.surgery.GradientCombiner`.
    """

    def _update(self, problem: TaskGramians) -> Array:
        return min_norm_weights(problem.grams[0])[None, :]
