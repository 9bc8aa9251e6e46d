"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import numpy as np
from torch.optim import Optimizer

from torch_seqreptile.surgery._base import Array, GramianCombiner, TaskGramians, random_orders


def pcgrad_coefficients(gram: Array, orders: list[list[int]]) -> Array:
    r"""PCGrad's projected gradients as combinations of the originals: ``g_i^PC = C[i] @ g``.

    Yu et al. (2020), Algorithm 1, lines 3-6, on the Gramian ``gram[i, j] = <g_i, g_j>``: for
    each task i, ``g_i^PC <- g_i``; for each other task j in ``orders[i]``, if
    :math:`\langle g_i^{PC}, g_j\rangle < 0` then
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j\rangle}{\|g_j\|^2} g_j`
    (projection onto the normal plane of the *original* g_j). Every ``g_i^PC`` stays a linear
    combination of the original gradients, so only the T×T matrix C is tracked:
    ``<g_i^PC, g_j> = (C @ gram)[i, j]``. A zero ``g_j`` is never projected on. Each step is
    a ratio of inner products, so C is invariant under ``gram -> c * gram``.
    """
    num_tasks = gram.shape[0]
    coef = np.eye(num_tasks)
    for i in range(num_tasks):
        for j in orders[i]:
            dot = float(coef[i] @ gram[:, j])
            if dot < 0.0 and gram[j, j] > 0.0:
                coef[i, j] -= dot / gram[j, j]
    return coef


def pcgrad_weights(gram: Array, orders: list[list[int]]) -> Array:
    r"""PCGrad's update :math:`\sum_i g_i^{PC} = \sum_m w_m g_m` (Algorithm 1, line 7).

    Returns ``w = 1ᵀ C`` with C from :func:`pcgrad_coefficients`.
    """
    return np.asarray(pcgrad_coefficients(gram, orders).sum(axis=0), dtype=np.float64)


class PCGrad(GramianCombiner):
    r"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    Each task gradient is projected onto the normal plane of every other task gradient it
    conflicts with (negative inner product), visiting the other tasks in a random order; the
    shared parameters get the sum of the projected gradients (:func:`pcgrad_weights`), heads
    their own gradient. For two tasks the update never conflicts with either task gradient.

    The random order comes from a ``torch.Generator`` seeded with ``seed`` (default
    ``torch.initial_seed()``); for task i it is ``randperm(T)`` with i removed, drawn for
    i = 0..T-1 at every ``backward``. Its state is in ``state_dict``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        seed: seed of the projection order.
        error_if_nonfinite: see :class:`~torch_seqreptile.surgery.GradientCombiner`.

    Example:
        Two conflicting task gradients, :math:`g_1 = (1, 0)` and :math:`g_2 = (-1, 1)`:

        >>> import torch
        >>> from torch_seqreptile.surgery import PCGrad
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = PCGrad(torch.optim.SGD([w], lr=0.1), num_tasks=2, seed=0)
        >>> opt.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])])
        >>> w.grad.tolist()  # (g_1 + g_2 / 2) + (g_2 + g_1): each projected off the other
        [0.5, 1.5]
        >>> opt.step()

    Cost: T backward passes, T gradients of the shared parameters in memory, the Gramian
    (T² inner products) and an O(T³) loop on the CPU.
    """

    uses_rng = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        num_tasks: int | None = None,
        seed: int | None = None,
        error_if_nonfinite: bool = True,
    ) -> None:
        super().__init__(
            optimizer, num_tasks=num_tasks, seed=seed, error_if_nonfinite=error_if_nonfinite
        )

    def _update(self, problem: TaskGramians) -> Array:
        assert self.generator is not None
        orders = random_orders(problem.grams.shape[-1], self.generator)
        return pcgrad_weights(problem.grams[0], orders)[None, :]
