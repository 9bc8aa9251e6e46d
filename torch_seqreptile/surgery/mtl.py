"""Plain multi-task learning: the gradient of the summed task losses."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from torch_seqreptile.surgery._base import Array, GradientCombiner


def mtl_weights(gram: Array) -> Array:
    """``w = 1``: the combined gradient is ``sum_t g_t`` (the MTL objective ``sum_t L_t``)."""
    return np.ones(gram.shape[-1])


class MTL(GradientCombiner):
    r"""Plain multi-task training, :math:`\nabla_\theta \sum_t L_t`, with the surgery API.

    ``backward(losses)`` checks the loss list (one finite scalar per task that requires grad)
    and runs one ``torch.autograd.backward(sum(losses))``: shared parameters get
    :math:`\sum_t g_t`, heads their task's gradient, and no per-task gradient is ever
    materialised (memory and time of ordinary training). It is the reference the other
    methods are timed against. Like ``sum(losses).backward()`` it does not check which
    parameters each loss reaches, nor the gradients for inf/NaN (a pass over them).

    Example (two tasks whose gradients are :math:`(1, 0)` and :math:`(-1, 1)`):

        >>> import torch
        >>> from torch_seqreptile.surgery import MTL
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = MTL(torch.optim.SGD([w], lr=0.1))
        >>> opt.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])])
        >>> w.grad.tolist()  # the sum
        [0.0, 1.0]

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        error_if_nonfinite: raise for a non-finite loss (default); with ``False`` it is
            back-propagated like any other (for ``GradScaler``).
    """

    def _combine(
        self, losses: list[Tensor], values: Array, finite: bool, retain_graph: bool
    ) -> None:
        total = sum((loss.reshape(()) for loss in losses[1:]), losses[0].reshape(()))
        torch.autograd.backward(total, retain_graph=retain_graph)
        self.last_weights = torch.ones(1, len(losses), dtype=torch.float64) if finite else None
