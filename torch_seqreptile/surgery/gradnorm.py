"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float, check_int
from torch_seqreptile.surgery._base import Array, GramianCombiner, TaskGramians


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


#: the weights' optimizer when none is given: Adam, as in the authors' code
DEFAULT_WEIGHT_LR = 0.025

WeightOptimizer = Callable[[list[Tensor]], Optimizer]


class GradNorm(GramianCombiner):
    r"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing
    in Deep Multitask Networks", ICML 2018).

    The model trains on :math:`L = \sum_i w_i L_i` with learnable task weights ``w`` (start
    at 1): every parameter, heads included, gets :math:`\sum_i w_i g_i` (Algorithm 1, "update
    W using ∇_W L"). The weights follow :math:`\nabla_w L_{grad}`
    (:func:`gradnorm_weight_grad`), which pushes each task's weighted gradient norm on the
    chosen shared ``layer`` toward the mean norm times its relative inverse training rate to
    the power ``alpha``. The norms come from the layer's T×T Gramian, so no second-order
    backward is needed.

    The weights are an ordinary leaf tensor, ``opt.loss_weights``, trained by their own
    ``torch.optim`` optimizer, ``opt.weight_optimizer`` (default ``Adam(lr=0.025)``; any via
    ``weight_optimizer=``): ``backward`` stores
    :math:`\nabla_w L_{grad} / \mathrm{mean}_i \|\nabla_W L_i\|` in ``loss_weights.grad``
    (the paper's gradient divided by a positive number each step: same direction, and the
    weights' update no longer depends on the losses' scale, e.g. a ``GradScaler``'s, a
    changing one included, or a sum instead of a mean reduction); ``step`` takes the inner step, then ``weight_optimizer.step()``
    (an ordinary call: its own hooks and LR schedulers work, e.g.
    ``LinearLR(opt.weight_optimizer, ...)``), then renormalises :math:`\sum_i w_i = T` (after
    clipping negative weights to 0). Weights, L_i(0) and the weight optimizer's state are in
    ``state_dict``.

    Degenerate input, never NaN weights: losses must be finite and >= 0 (the training rates
    :math:`L_i/L_i(0)` are ratios of losses), the first call's losses > 0 (they are
    :math:`L_i(0)`) — else ``ValueError`` before anything changes. A call where every loss
    is 0, or every task's gradient on the layer is 0, has nothing to balance: the model is
    updated with the current weights and the weights are not (``loss_weights.grad`` stays
    ``None`` and ``step`` skips the weight step). A task with a zero gradient on the layer
    gets a zero weight gradient.

    Example (task 0's gradient is the larger on the layer, so its weight goes down):

        >>> import torch
        >>> from torch_seqreptile.surgery import GradNorm
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = GradNorm(torch.optim.SGD([w], lr=0.1), 2, alpha=1.5)
        >>> opt.backward([(w @ torch.tensor([1.0, 0.0])) ** 2 + 1, (w @ torch.tensor([-1.0, 1.0])) ** 2 + 1])
        >>> opt.step()
        >>> [round(x, 3) for x in opt.loss_weights.tolist()]
        [0.987, 1.013]

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T (required: the weights exist from the start).
        alpha: asymmetry, in [0, inf) (paper: 0.12 to 1.5; 0 equalises the norms).
        layer: the shared parameters W whose gradient norms are balanced ("usually the last
            shared layer", as in the paper): a module (its parameters), a parameter or an
            iterable of parameters; every task must reach all of them. Default: the last
            shared parameter tensor (in ``param_groups`` order) at the first ``backward``,
            kept from then on (often a bias or a LayerNorm: pass the layer for the paper's
            choice).
        weight_lr: learning rate of the default Adam of the weights, in (0, inf) (default
            0.025); not with ``weight_optimizer``.
        weight_optimizer: a function that builds the weights' optimizer from ``[w]``, e.g.
            ``lambda w: torch.optim.SGD(w, lr=0.1)``.
        error_if_nonfinite: see :class:`~torch_seqreptile.surgery.GradientCombiner`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int,
        alpha: float = 1.5,
        *,
        layer: Tensor | nn.Module | Iterable[Tensor] | None = None,
        weight_lr: float | None = None,
        weight_optimizer: WeightOptimizer | None = None,
        error_if_nonfinite: bool = True,
    ) -> None:
        num_tasks = check_int("num_tasks", num_tasks, 1)
        self.alpha = check_float("alpha", alpha, 0.0, math.inf, open_high=True)
        if weight_lr is not None and weight_optimizer is not None:
            raise ValueError("pass weight_lr or weight_optimizer, not both")
        if weight_lr is not None:
            weight_lr = check_float("weight_lr", weight_lr, 0.0, math.inf, open_high=True)
            if weight_lr == 0.0:
                raise ValueError("weight_lr must be in (0, inf), got 0.0")
        if weight_optimizer is not None and not callable(weight_optimizer):
            raise TypeError(
                "weight_optimizer must be a function of [loss_weights] returning an optimizer, "
                f"got {type(weight_optimizer).__name__}"
            )
        super().__init__(optimizer, num_tasks=num_tasks, error_if_nonfinite=error_if_nonfinite)
        index = {id(p): i for i, p in enumerate(self.params())}
        #: indices (in ``params()`` order) of the layer W; the default is fixed by the first
        #: ``backward`` and kept in ``state_dict``
        self._layer: list[int] | None = None
        self._default_layer: list[int] = []  # found by _blocks, fixed by _update
        if layer is not None:
            tensors: list[Tensor]
            if isinstance(layer, nn.Module):
                tensors = [p for p in layer.parameters() if p.requires_grad]
            else:
                tensors = [layer] if isinstance(layer, Tensor) else list(layer)
            if not tensors or any(id(p) not in index for p in tensors):
                raise ValueError("layer must be one or more parameters of the optimizer")
            self._layer = sorted(index[id(p)] for p in tensors)
        #: the task weights w (float64 leaf tensor, start at 1)
        self.loss_weights = torch.ones(num_tasks, dtype=torch.float64, requires_grad=True)
        if weight_optimizer is None:
            lr = DEFAULT_WEIGHT_LR if weight_lr is None else weight_lr
            weights_opt: Optimizer = torch.optim.Adam([self.loss_weights], lr=lr)
        else:
            weights_opt = weight_optimizer([self.loss_weights])
            if not isinstance(weights_opt, Optimizer):
                raise TypeError(
                    "weight_optimizer must return a torch.optim.Optimizer, got "
                    f"{type(weights_opt).__name__}"
                )
        #: the optimizer of ``loss_weights`` (stepped by ``step``; schedulable)
        self.weight_optimizer = weights_opt
        #: L_i(0), the losses of the first ``backward``
        self.initial_losses: Tensor | None = None

    def _check_values(self, values: Array) -> None:
        finite = np.isfinite(values)
        negative = np.flatnonzero(finite & (values < 0.0))
        if len(negative):
            raise ValueError(
                "GradNorm needs losses >= 0 (its training rates L_i/L_i(0) are ratios of "
                f"losses); losses[{negative[0]}] = {values[negative[0]]}"
            )
        zero = np.flatnonzero(values == 0.0)
        if self.initial_losses is None and len(zero):
            raise ValueError(
                "GradNorm needs positive initial losses (it divides by L_i(0)); "
                f"losses[{zero[0]}] = 0.0 in the first call"
            )

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        # block 0: the balanced layer, block 1: every other shared parameter
        layer = self._layer
        if layer is None:
            self._default_layer = layer = indices[-1:]
        return [0 if i in layer else 1 for i in indices], 2

    def _head_scale(self, task: int) -> float:
        return float(self.loss_weights[task])

    def _update(self, problem: TaskGramians) -> Array:
        num_tasks = problem.grams.shape[-1]
        weights = self.loss_weights.detach().numpy().copy()
        if num_tasks == 1:  # nothing to balance: plain training, w stays 1
            return np.ones((2, 1))
        if 0 not in problem.active:
            raise ValueError("layer must be reached by every task's loss; fewer than two do")
        if not problem.reached[0].all():
            missing = int(np.argmin(problem.reached[0]))
            raise ValueError(
                f"layer must be reached by every task's loss; losses[{missing}] is not"
            )
        losses = problem.losses
        self.loss_weights.grad = None
        if self._layer is None:
            self._layer = self._default_layer
        if self.initial_losses is None:
            self.initial_losses = torch.from_numpy(np.array(losses, dtype=np.float64))
        norms = np.sqrt(np.maximum(np.diag(problem.grams[0]), 0.0))
        rates = losses / self.initial_losses.numpy()
        if rates.sum() > 0.0 and norms.max() > 0.0:
            grad = gradnorm_weight_grad(
                weights, norms, losses, self.initial_losses.numpy(), self.alpha
            )
            self.loss_weights.grad = torch.from_numpy(grad / norms.mean())  # scale-free
        return np.stack([weights, weights])

    def _after_step(self) -> None:
        if self.loss_weights.grad is None or self.last_weights is None:
            self.loss_weights.grad = None  # no weight update this step (or non-finite call)
            return
        self.weight_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.loss_weights.clamp_(min=0.0)
            total = float(self.loss_weights.sum())
            if total > 0.0:
                self.loss_weights.mul_(len(self.loss_weights) / total)
            else:  # every weight was pushed to 0: start again from 1
                self.loss_weights.fill_(1.0)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "loss_weights": self.loss_weights.detach().clone(),
            "initial_losses": self.initial_losses,
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "layer": None if self._layer is None else list(self._layer),
        }

    def _load_extra_state(self, state: dict[str, Any], num_tasks: int | None) -> Callable[[], None]:
        where = "state_dict['surgery']['method_state']"
        alpha = check_float(f"{where}['alpha']", state.get("alpha"), 0.0, math.inf, open_high=True)
        weights = state.get("loss_weights")
        shape = tuple(self.loss_weights.shape)
        if (
            not isinstance(weights, Tensor)
            or tuple(weights.shape) != shape
            or not bool((torch.isfinite(weights) & (weights >= 0)).all())
        ):
            raise ValueError(f"{where}['loss_weights'] must be {shape[0]} finite numbers >= 0")
        initial = state.get("initial_losses")
        if initial is not None and (
            not isinstance(initial, Tensor)
            or tuple(initial.shape) != shape
            or not bool((torch.isfinite(initial) & (initial > 0)).all())
        ):
            raise ValueError(
                f"{where}['initial_losses'] must be None or {shape[0]} finite positive numbers"
            )
        layer = state.get("layer")
        count = sum(1 for _ in self.params())
        if layer is not None and (
            not isinstance(layer, list)
            or not layer
            or not all(isinstance(i, int) and 0 <= i < count for i in layer)
        ):
            raise ValueError(f"{where}['layer'] must be None or parameter indices < {count}")
        saved = state.get("weight_optimizer")
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
            raise ValueError(f"{where}['weight_optimizer'] must be an optimizer state_dict")
        if [len(g.get("params", ())) for g in saved["param_groups"]] != [
            len(g["params"]) for g in self.weight_optimizer.param_groups
        ]:
            raise ValueError(
                f"{where}['weight_optimizer'] does not match this optimizer's weight optimizer"
            )
        for entry in saved.get("state", {}).values():
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != shape:
                    raise ValueError(
                        f"{where}['weight_optimizer'] state {key!r} has shape "
                        f"{tuple(value.shape)}, expected {shape}"
                    )

        def restore() -> None:
            self.weight_optimizer.load_state_dict(saved)
            self.alpha = alpha
            if layer is not None:  # saved after the first backward (or given explicitly)
                self._layer = sorted(layer)
            with torch.no_grad():
                self.loss_weights.copy_(weights)
            self.loss_weights.grad = None
            self.initial_losses = None if initial is None else initial.double().cpu().clone()

        return restore
