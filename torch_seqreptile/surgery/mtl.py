"""Plain multi-task learning: the gradient of the summed task losses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from torch_seqreptile.surgery._base import Array, GradientCombiner


def mtl_weights(gram: Array) -> Array:
    """``w = 1``: the combined gradient is ``sum_t g_t`` (the MTL objective ``sum_t L_t``)."""
    return np.ones(gram.shape[-1])


def _reaches(loss: Tensor, targets: set[int]) -> bool:
    """Whether the autograd graph of ``loss`` reaches a tensor whose ``id`` is in ``targets``."""
    if id(loss) in targets:
        return True
    stack = [loss.grad_fn]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


class MTL(GradientCombiner):
    r"""Plain multi-task training, :math:`\nabla_\theta \sum_t L_t`, with the surgery API.

    ``backward(losses)`` is one ``torch.autograd.backward(sum(losses))``: shared parameters get
    :math:`\sum_t g_t`, heads their task's gradient, so no per-task gradient is ever
    materialised (memory and time of ordinary training). It is the reference the other methods
    are timed against. Before the backward pass every loss is checked to be finite and to reach
    a parameter of the optimizer (a walk of its autograd graph that stops at the first one).
    Gradients themselves are not checked for inf/NaN (that would cost a pass over them).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
    """

    def _weights(self, grams: Array, active: list[int], losses: Array) -> Array:
        return mtl_weights(grams[0])[None, :]

    def backward(self, losses: Sequence[Tensor], *, retain_graph: bool = False) -> None:
        checked = self._check_losses(losses)
        values = torch.stack([loss.detach().reshape(()).double() for loss in checked]).cpu()
        self._check_finite("losses", values)
        targets = {id(p) for p in self.params() if p.requires_grad}
        for t, loss in enumerate(checked):
            if not _reaches(loss, targets):
                raise ValueError(
                    f"losses[{t}] reaches none of the optimizer's parameters; every loss must "
                    "depend on at least one parameter that requires grad"
                )
        total = sum((loss.reshape(()) for loss in checked[1:]), checked[0].reshape(()))
        torch.autograd.backward(total, retain_graph=retain_graph)
        if self.num_tasks is None:
            self.num_tasks = len(checked)
        self.last_weights = torch.ones(1, len(checked), dtype=torch.float64)
