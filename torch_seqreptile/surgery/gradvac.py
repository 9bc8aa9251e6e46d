"""GradVac: gradient vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_seqreptile._validation import check_float
from torch_seqreptile.surgery._base import Array, GramianCombiner, TaskGramians, random_orders


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


Layers = nn.Module | Sequence[Iterable[Tensor]] | str | None

#: block of the shared parameters in no listed layer
REST = "<rest>"


class GradVac(GramianCombiner):
    r"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021).

    Per layer (the paper's granularity) and per task pair, an exponential moving average
    :math:`\hat\phi_{ij}` of the observed gradient cosine is the similarity goal; a task
    gradient whose cosine with another falls below it is moved toward it, one that already
    exceeds it is left unchanged (:func:`gradvac_weights`). Targets start at 0
    (:math:`\hat\phi^{(0)} = 0`, which makes the first step PCGrad-like) and live in
    ``state_dict``, one ``(T, T)`` matrix per block, named in ``block_names``. Heads get their
    own gradient.

    Example (targets start at 0: the first step projects like PCGrad):

        >>> import torch
        >>> from torch_seqreptile.surgery import GradVac
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = GradVac(torch.optim.SGD([w], lr=0.1), beta=0.01, layers="tensor", seed=0)
        >>> opt.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])])
        >>> w.grad.tolist(), opt.block_names
        ([0.5, 1.5], ['params[0]'])

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        beta: EMA rate of the targets, in [0, 1] (paper: 1e-2).
        layers: the blocks ("layers") the similarity is measured on:

            * ``None`` (default): one block per module, read from the parameter names of an
              optimizer built from ``model.named_parameters()`` (``encoder.layer.0.output.dense
              .weight`` and ``.bias`` form the block ``encoder.layer.0.output.dense``);
            * an ``nn.Module``: one block per submodule that holds parameters itself (a
              ``Linear``, a ``LayerNorm``, an ``Embedding``), named by its path; the
              submodules it has at construction (a module added to the model later is
              ``"<rest>"``: pass named parameters for that);
            * a sequence of parameter iterables, e.g. ``[l.parameters() for l in
              bert.encoder.layer]`` for one block per transformer layer, named ``layers[i]``;
            * ``"tensor"``: one block per parameter tensor.

            Shared parameters outside the given module or layers form one more block,
            ``"<rest>"``. Parameters added later (``add_param_group``) get their blocks the
            same way; new blocks start at target 0.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        seed: seed of the random order of line 3 (as in :class:`PCGrad`).
        error_if_nonfinite: see :class:`~torch_seqreptile.surgery.GradientCombiner`.
    """

    uses_rng = True

    def __init__(
        self,
        optimizer: Optimizer,
        beta: float = 1e-2,
        *,
        layers: Layers = None,
        num_tasks: int | None = None,
        seed: int | None = None,
        error_if_nonfinite: bool = True,
    ) -> None:
        self.beta = check_float("beta", beta, 0.0, 1.0, open_high=False)
        if layers is not None and not isinstance(layers, (str, nn.Module)):
            layers = [list(layer) for layer in layers]  # a generator too: checked like a list
        self._by_name = layers is None
        self._per_tensor = isinstance(layers, str)
        if isinstance(layers, str) and layers != "tensor":
            raise ValueError(
                f"layers must be a module, a list of layers or 'tensor', got {layers!r}"
            )
        self._layer_of = {} if layers is None or isinstance(layers, str) else _layer_names(layers)
        super().__init__(
            optimizer, num_tasks=num_tasks, seed=seed, error_if_nonfinite=error_if_nonfinite
        )
        if isinstance(layers, Sequence) and not isinstance(layers, str):
            own = set(self.params())
            for key, name in self._layer_of.items():
                if key not in own:
                    raise ValueError(
                        f"{name} holds a tensor that is not a parameter of the optimizer"
                    )
        #: the name of each block, in the order of the rows of ``targets``
        self.block_names: list[str] = []
        #: float64 ``(blocks, T, T)`` EMA targets, created by the first ``backward``
        self.targets: Tensor | None = None
        self._new_blocks: list[str] = []  # found by _blocks, committed by _update

    def _check_new_group(self, group: dict[str, Any]) -> None:
        if self._by_name:
            _require_names(group, "param_group")

    def _block_name(self, index: int, param: Tensor, name: str | None) -> str:
        if self._per_tensor:
            return f"params[{index}]"
        if self._by_name:
            assert name is not None
            return name.rpartition(".")[0] or "<root>"
        return self._layer_of.get(param, REST)

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        params = list(self.params())
        names: list[str | None] = []
        for group in self.param_groups:
            names += group.get("param_names", [None] * len(group["params"]))
        known = {name: block for block, name in enumerate(self.block_names)}
        self._new_blocks = []
        ids = []
        for i in indices:
            name = self._block_name(i, params[i], names[i])
            if name not in known:  # a new block (first call, or a group added since)
                known[name] = len(known)
                self._new_blocks.append(name)
            ids.append(known[name])
        return ids, len(known)

    def _update(self, problem: TaskGramians) -> Array:
        assert self.generator is not None
        num_blocks, num_tasks = problem.grams.shape[:2]
        targets = np.zeros((num_blocks, num_tasks, num_tasks))
        if self.targets is not None:
            targets[: len(self.targets)] = self.targets.numpy()
        weights = np.ones((num_blocks, num_tasks))
        orders = random_orders(num_tasks, self.generator)  # one order for all blocks
        for block in problem.active:
            weights[block], targets[block] = gradvac_weights(
                problem.grams[block], targets[block], self.beta, orders
            )
        self.targets = torch.from_numpy(targets)
        self.block_names += self._new_blocks
        return weights

    def _extra_state(self) -> dict[str, Any]:
        return {"beta": self.beta, "targets": self.targets, "block_names": list(self.block_names)}

    def _load_extra_state(self, state: dict[str, Any], num_tasks: int | None) -> Callable[[], None]:
        where = "state_dict['surgery']['method_state']"
        beta = check_float(f"{where}['beta']", state.get("beta"), 0.0, 1.0, open_high=False)
        targets, names = state.get("targets"), state.get("block_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}['block_names'] must be a list of str")
        if targets is not None:
            tasks = num_tasks
            if isinstance(targets, Tensor) and tasks is None:
                tasks = targets.shape[-1]
            if (
                not isinstance(targets, Tensor)
                or targets.dim() != 3
                or len(targets) > len(names)
                or tuple(targets.shape[1:]) != (tasks, tasks)
                or not bool((targets.abs() <= 1.0).all())
            ):
                raise ValueError(
                    f"{where}['targets'] must be a (blocks, {tasks}, {tasks}) tensor of cosines "
                    f"in [-1, 1] with at most one block per name ({len(names)})"
                )

        def restore() -> None:
            self.beta = beta
            self.block_names = list(names)
            self.targets = None if targets is None else targets.detach().double().cpu().clone()

        return restore


def _layer_names(layers: nn.Module | Sequence[Iterable[Tensor]]) -> dict[Tensor, str]:
    """``parameter -> block name`` for a module's submodules or an explicit layer list.

    Keyed by the tensors themselves (hashed by identity), so ``copy.deepcopy`` of the
    optimizer maps the copies' parameters to the same names.
    """
    names: dict[Tensor, str] = {}
    if isinstance(layers, nn.Module):
        for path, module in layers.named_modules():
            for param in module.parameters(recurse=False):
                names.setdefault(param, path or "<root>")  # a tied weight: its first owner
        return names
    for number, layer in enumerate(layers):
        for param in layer:
            if not isinstance(param, Tensor):
                raise TypeError(f"layers[{number}] must hold tensors, got {type(param).__name__}")
            if param in names:
                raise ValueError(f"layers[{number}] repeats a parameter of another layer")
            names[param] = f"layers[{number}]"
    return names


def _require_names(group: dict[str, Any], where: str) -> None:
    params = group["params"]
    named = "param_names" in group or (
        isinstance(params, list) and bool(params) and all(isinstance(p, tuple) for p in params)
    )
    if not named:
        raise ValueError(
            f"{where} has no parameter names, so GradVac cannot find its layers: build the "
            "optimizer from model.named_parameters(), or pass layers=model (one block per "
            "module), a list of layers, or layers='tensor'"
        )
