"""GradVac: gradient vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float
from torch_seqreptile.surgery._base import Array, GradientCombiner, random_orders


def gradvac_weights(
    gram: Array, targets: Array, beta: float, orders: list[list[int]]
) -> tuple[Array, Array]:
    r"""GradVac (Wang et al., 2021, Algorithm 1) for one block; returns (weights, new targets).

    Lines 2-9, for each task i and each other task j in ``orders[i]``:
    :math:`\phi_{ij} = \cos(g_i', g_j)`; if :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math::
        g_i' \leftarrow g_i' + \frac{\|g_i'\|\,(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2})}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j

    (which makes :math:`\cos(g_i', g_j) = \hat\phi_{ij}`), then the EMA target
    :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\,\phi_{ij}`. Line 11: the
    update is :math:`\sum_i g_i'`. As in PCGrad, :math:`g_i' = \sum_m C_{im} g_m` is tracked
    through its coefficients, so everything is computed from the Gramian. A pair where a
    gradient is zero (cosine undefined) or the target is ±1 is skipped, target unchanged.
    """
    num_tasks = gram.shape[0]
    coef = np.eye(num_tasks)
    new = np.array(targets, dtype=np.float64, copy=True)
    for i in range(num_tasks):
        for j in orders[i]:
            norm_i = math.sqrt(max(float(coef[i] @ gram @ coef[i]), 0.0))
            norm_j = math.sqrt(max(float(gram[j, j]), 0.0))
            if norm_i == 0.0 or norm_j == 0.0:
                continue
            phi = min(max(float(coef[i] @ gram[:, j]) / (norm_i * norm_j), -1.0), 1.0)
            target = float(new[i, j])
            if phi < target and abs(target) < 1.0:
                root = math.sqrt(1.0 - target * target)
                coef[i, j] += (
                    norm_i * (target * math.sqrt(1.0 - phi * phi) - phi * root) / (norm_j * root)
                )
            new[i, j] = (1.0 - beta) * target + beta * phi
    return np.asarray(coef.sum(axis=0), dtype=np.float64), new


class GradVac(GradientCombiner):
    r"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021).

    Per layer (the paper's Sec. 4.2 granularity) and per task pair, an exponential moving
    average :math:`\hat\phi_{ij}` of the observed gradient cosine is the similarity goal; a
    task gradient whose cosine with another falls below it is moved toward it, one that
    already exceeds it is left unchanged (:func:`gradvac_weights`). Targets start at 0
    (:math:`\hat\phi^{(0)} = 0`, which makes the first step PCGrad-like) and live in
    ``state_dict``. Heads get their own gradient.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        beta: EMA rate of the targets, in [0, 1] (paper: 1e-2).
        layers: the blocks ("layers") the similarity is measured on, each an iterable of
            parameters of ``optimizer``, e.g. ``[list(l.parameters()) for l in encoder.layers]``;
            shared parameters in no listed layer form one extra block. Default: every
            parameter tensor is its own block.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        seed: seed of the random order of line 3 (as in :class:`PCGrad`).
    """

    uses_rng = True

    def __init__(
        self,
        optimizer: Optimizer,
        beta: float = 1e-2,
        *,
        layers: Sequence[Iterable[Tensor]] | None = None,
        num_tasks: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(optimizer, num_tasks=num_tasks, seed=seed)
        self.beta = check_float("beta", beta, 0.0, 1.0, open_high=False)
        index = {id(p): i for i, p in enumerate(self.params())}
        self._layer_of: dict[int, int] | None = None
        if layers is not None:
            self._layer_of = {}
            for number, layer in enumerate(layers):
                for param in layer:
                    if id(param) not in index:
                        raise ValueError(
                            f"layers[{number}] holds a tensor that is not a parameter of the "
                            "optimizer"
                        )
                    if index[id(param)] in self._layer_of:
                        raise ValueError(f"layers[{number}] repeats a parameter of another layer")
                    self._layer_of[index[id(param)]] = number
            self._num_blocks = len(layers) + 1
        else:
            self._num_blocks = len(index)
        #: float64 ``(blocks, T, T)`` EMA targets, created by the first ``backward``
        self.targets: Tensor | None = None

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        if self._layer_of is None:
            return list(indices), self._num_blocks
        rest = self._num_blocks - 1
        return [self._layer_of.get(i, rest) for i in indices], self._num_blocks

    def _weights(self, grams: Array, active: list[int], losses: Array) -> Array:
        assert self.generator is not None
        num_tasks = grams.shape[-1]
        targets = (
            np.zeros((self._num_blocks, num_tasks, num_tasks))
            if self.targets is None
            else self.targets.numpy().copy()
        )
        weights = np.ones((self._num_blocks, num_tasks))
        orders = random_orders(num_tasks, self.generator)  # one order for all blocks
        for block in active:
            weights[block], targets[block] = gradvac_weights(
                grams[block], targets[block], self.beta, orders
            )
        self.targets = torch.from_numpy(targets)
        return weights

    def _extra_state(self) -> dict[str, Any]:
        return {"beta": self.beta, "targets": self.targets}

    def _load_extra_state(self, state: dict[str, Any]) -> Callable[[], None]:
        targets = state["targets"]
        if targets is not None and (
            not isinstance(targets, Tensor)
            or targets.dim() != 3
            or len(targets) != self._num_blocks
        ):
            raise ValueError(f"state_dict['method']['targets'] must have {self._num_blocks} blocks")

        def restore() -> None:
            self.beta = float(state["beta"])
            self.targets = None if targets is None else targets.detach().double().cpu().clone()

        return restore
