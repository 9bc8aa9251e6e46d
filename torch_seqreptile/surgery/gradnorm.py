"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float, check_int
from torch_seqreptile._wrapper import unhooked_step
from torch_seqreptile.surgery._base import Array, GradientCombiner


def gradnorm_weight_grad(
    weights: Array, norms: Array, losses: Array, initial_losses: Array, alpha: float
) -> Array:
    r"""The GradNorm gradient :math:`\nabla_w L_{grad}` (Chen et al., 2018, Algorithm 1).

    :math:`G_W^{(i)} = w_i \|\nabla_W L_i\|` (``norms`` are the unweighted norms),
    :math:`\bar G_W = \mathrm{mean}_i G_W^{(i)}`,
    :math:`r_i = \tilde L_i / \mathrm{mean}_j \tilde L_j` with :math:`\tilde L_i = L_i/L_i(0)`,
    :math:`L_{grad} = \sum_i |G_W^{(i)} - \bar G_W\, r_i^\alpha|` with the targets
    :math:`\bar G_W r_i^\alpha` held constant (Eq. 2), hence
    :math:`\partial L_{grad}/\partial w_i = \mathrm{sign}(G_W^{(i)} - \bar G_W r_i^\alpha)\,
    \|\nabla_W L_i\|`.
    """
    inverse_rate = losses / initial_losses
    ratio = inverse_rate / inverse_rate.mean()
    scaled = weights * norms
    target = scaled.mean() * ratio**alpha
    return np.asarray(np.sign(scaled - target) * norms, dtype=np.float64)


class GradNorm(GradientCombiner):
    r"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing
    in Deep Multitask Networks", ICML 2018).

    The model trains on :math:`L = \sum_i w_i L_i` with learnable task weights ``w`` (start
    at 1): every parameter, heads included, gets :math:`\sum_i w_i g_i` (Algorithm 1, "update
    W using ∇_W L"). The weights follow :math:`\nabla_w L_{grad}`
    (:func:`gradnorm_weight_grad`), which pushes each task's weighted gradient norm on the
    chosen shared ``layer`` toward the mean norm times its relative inverse training rate to
    the power ``alpha``. The norms come from the layer's T×T Gramian, so no second-order
    backward is needed. ``backward`` stores that gradient in ``loss_weights.grad``; ``step``
    takes the inner step, then a step of the weights' own Adam (learning rate ``weight_lr``),
    then renormalises :math:`\sum_i w_i = T`. L_i(0) are the losses of the first ``backward``
    (they must be positive). Weights, L_i(0) and the weight optimizer are in ``state_dict``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T (required: the weights exist from the start).
        alpha: asymmetry, in [0, inf) (paper: 0.12 to 1.5; 0 equalises the norms).
        layer: the shared parameters W whose gradient norms are balanced; every task must
            reach all of them. Default: the last shared parameter (in ``param_groups``
            order), "usually the last shared layer" as in the paper.
        weight_lr: learning rate of the weights' Adam, in (0, inf) (default 0.025).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int,
        alpha: float = 1.5,
        *,
        layer: Tensor | Iterable[Tensor] | None = None,
        weight_lr: float = 0.025,
    ) -> None:
        num_tasks = check_int("num_tasks", num_tasks, 1)
        super().__init__(optimizer, num_tasks=num_tasks)
        self.alpha = check_float("alpha", alpha, 0.0, math.inf, open_high=True)
        weight_lr = check_float("weight_lr", weight_lr, 0.0, math.inf, open_high=True)
        if weight_lr == 0.0:
            raise ValueError("weight_lr must be in (0, inf), got 0.0")
        index = {id(p): i for i, p in enumerate(self.params())}
        self._layer: list[int] | None = None
        if layer is not None:
            tensors = [layer] if isinstance(layer, Tensor) else list(layer)
            if not tensors or any(id(p) not in index for p in tensors):
                raise ValueError("layer must be one or more parameters of the optimizer")
            self._layer = sorted(index[id(p)] for p in tensors)
        self.loss_weights = torch.ones(num_tasks, dtype=torch.float64, requires_grad=True)
        self.weight_optimizer = torch.optim.Adam([self.loss_weights], lr=weight_lr)
        self.initial_losses: Tensor | None = None
        self._reached_by_all: list[int] = []

    def backward(self, losses: Sequence[Tensor], *, retain_graph: bool = False) -> None:
        if self.initial_losses is None:
            checked = self._check_losses(losses)
            values = [float(loss.detach().reshape(())) for loss in checked]
            bad = [t for t, v in enumerate(values) if not v > 0.0 or not math.isfinite(v)]
            if bad:
                raise ValueError(
                    f"GradNorm needs positive, finite initial losses (it divides by L_i(0)); "
                    f"losses[{bad[0]}] = {values[bad[0]]}"
                )
        super().backward(losses, retain_graph=retain_graph)

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        # block 0: the balanced layer, block 1: every other shared parameter
        layer = self._layer
        if layer is None:
            layer = indices[-1:]
        return [0 if i in layer else 1 for i in indices], 2

    def _head_scale(self, task: int) -> float:
        return float(self.loss_weights[task])

    def _weights(self, grams: Array, active: list[int], losses: Array) -> Array:
        num_tasks = grams.shape[-1]
        if num_tasks == 1:  # nothing to balance: plain training, w stays 1
            self.loss_weights.grad = torch.zeros_like(self.loss_weights)
            return np.ones((2, 1))
        if 0 not in active:
            raise ValueError("layer must be reached by at least two tasks' losses")
        norms = np.sqrt(np.maximum(np.diag(grams[0]), 0.0))
        if np.any(norms == 0.0):
            raise ValueError(
                f"every task must reach the GradNorm layer; losses[{int(np.argmin(norms))}] "
                "does not (or its gradient there is zero)"
            )
        if self.initial_losses is None:
            self.initial_losses = torch.from_numpy(np.array(losses, dtype=np.float64))
        weights = self.loss_weights.detach().numpy().copy()
        grad = gradnorm_weight_grad(weights, norms, losses, self.initial_losses.numpy(), self.alpha)
        self.loss_weights.grad = torch.from_numpy(grad)
        return np.stack([weights, weights])

    def _after_step(self) -> None:
        if self.loss_weights.grad is None:
            return
        unhooked_step(self.weight_optimizer)
        self.weight_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.loss_weights.mul_(len(self.loss_weights) / self.loss_weights.sum())

    def _extra_state(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "loss_weights": self.loss_weights.detach().clone(),
            "initial_losses": self.initial_losses,
            "weight_optimizer": self.weight_optimizer.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> Callable[[], None]:
        weights = state["loss_weights"]
        if not isinstance(weights, Tensor) or weights.shape != self.loss_weights.shape:
            raise ValueError(
                f"state_dict['method']['loss_weights'] must have shape "
                f"{tuple(self.loss_weights.shape)}"
            )

        def restore() -> None:
            self.alpha = float(state["alpha"])
            with torch.no_grad():
                self.loss_weights.copy_(weights)
            self.loss_weights.grad = None
            initial = state["initial_losses"]
            self.initial_losses = None if initial is None else initial.double().cpu().clone()
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])

        return restore
