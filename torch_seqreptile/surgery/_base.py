"""Shared bases of the multi-task gradient-combination optimizers (``torch_seqreptile.surgery``).

:class:`GradientCombiner` holds what every method shares: the ``backward(losses)`` checks,
``num_tasks``, the state dict and ``step``. :class:`~torch_seqreptile.surgery.GramianCombiner` (all methods but MTL)
fills ``.grad`` from per-task gradients:

1. per-task gradients ``g_t = torch.autograd.grad(loss_t, params, allow_unused=True)``, one
   task at a time (the graph is retained until the last task);
2. a parameter is **shared** when two or more losses reach it (autograd returns a tensor, not
   ``None``, for it), **task-specific** (a head) when exactly one loss reaches it, unused when
   none does. A task that does not reach a shared parameter contributes zeros there;
3. per block of shared parameters (one block for most methods, one per layer for GradVac) the
   T×T Gramian ``G[i, j] = <g_i, g_j>`` is accumulated in float64
   (:func:`torch_seqreptile._gramian.add_gramian_`, a bounded chunk at a time, the chunk's
   products in float32 unless the gradients are float64);
4. the method turns the Gramians into weights ``W[block, t]`` (a small float64 problem on the
   CPU, invariant to the scale of the gradients), and every shared parameter gets
   ``sum_t W[block, t] g_t``; a head gets its task's gradient (times ``_head_scale``, 1
   except for GradNorm); unused parameters keep their ``.grad``. Results are *added* to
   ``.grad`` like ``Tensor.backward`` does.

Peak extra memory is the T per-task gradients plus one parameter-sized output (per-task
gradients are freed parameter by parameter as the combined one is written), i.e. about
(T + 1) × the shared parameters; see ``docs/baselines.md`` for measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._gramian import add_gramian_
from torch_seqreptile._validation import check_int
from torch_seqreptile._wrapper import OptimizerWrapper

Array = npt.NDArray[np.float64]

#: elements per task converted to float64 at a time when forming a Gramian, at least
_MIN_CHUNK = 1 << 12

NONFINITE_HINT = (
    "; with a GradScaler (which expects inf/NaN gradients on overflow and skips the step) "
    "pass error_if_nonfinite=False"
)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (default: ``torch.initial_seed()``)."""
    if seed is None:
        seed = torch.initial_seed() % (1 << 63)
    seed = check_int("seed", seed, 0)
    return torch.Generator().manual_seed(seed)


def random_orders(num_tasks: int, generator: torch.Generator) -> list[list[int]]:
    """For each task i, the other tasks in random order: ``randperm(T)`` without i.

    The order the projections of PCGrad (Yu et al., 2020, Alg. 1 line 4) and GradVac
    (Wang et al., 2021, Alg. 1 line 3) visit the other tasks in.
    """
    orders = []
    for i in range(num_tasks):
        perm = torch.randperm(num_tasks, generator=generator).tolist()
        orders.append([j for j in perm if j != i])
    return orders


def normalized_gramian(gram: Array) -> Array | None:
    """``G / max_t G_tt`` (symmetrised), or ``None`` when every gradient is zero.

    Every weighting here is invariant under ``G -> cG`` (c > 0), so the solvers work on this
    matrix, whose largest squared norm is 1: tolerances are relative to the largest task
    gradient, whatever the gradients' scale (1e-8 or a GradScaler's 2**16 alike).
    """
    gram = np.asarray(gram, dtype=np.float64)
    scale = float(np.max(np.diag(gram))) if gram.size else 0.0
    if not scale > 0.0:
        return None
    gram = gram / scale
    return np.asarray(0.5 * (gram + gram.T), dtype=np.float64)


@dataclass(frozen=True)
class TaskGramians:
    """What a Gramian-based method sees of one ``backward`` call.

    Attributes:
        grams: ``(blocks, T, T)`` float64 Gramians of the task gradients, per block.
        reached: ``(blocks, T)`` booleans: task t reaches a shared parameter of the block.
        active: the blocks that hold a shared parameter this call.
        losses: ``(T,)`` float64 loss values (detached).
    """

    grams: Array
    reached: npt.NDArray[np.bool_]
    active: list[int]
    losses: Array


class GradientCombiner(OptimizerWrapper):
    """Wraps an optimizer; ``backward(losses)`` writes a combination of task gradients.

    Subclasses implement ``_combine`` (``MTL``) or derive from :class:`~torch_seqreptile.surgery.GramianCombiner`.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        num_tasks: T; if omitted, fixed by the first ``backward`` call.
        seed: seed of the method's random task order (PCGrad, GradVac).
        error_if_nonfinite: raise ``ValueError`` for a non-finite loss or task gradient
            (default). With ``False``, such a call writes the plain sum of the task
            gradients (non-finite) to ``.grad`` and leaves the method's state as it was, which
            is what ``torch.amp.GradScaler`` expects: it finds the inf/NaN and skips the step.
    """

    #: whether the method has a random task order (PCGrad, GradVac): a seeded generator
    uses_rng = False

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        num_tasks: int | None = None,
        seed: int | None = None,
        error_if_nonfinite: bool = True,
    ) -> None:
        if seed is not None and not self.uses_rng:
            raise TypeError(
                f"{type(self).__name__} has no random task order: seed is for PCGrad and GradVac"
            )
        super().__init__(optimizer)
        self.num_tasks: int | None = (
            None if num_tasks is None else check_int("num_tasks", num_tasks, 1)
        )
        self.generator: torch.Generator | None = make_generator(seed) if self.uses_rng else None
        self.error_if_nonfinite = bool(error_if_nonfinite)
        #: float64 ``(blocks, T)`` weights of the last ``backward`` (for inspection); ``None``
        #: before the first call and after a call with non-finite gradients
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ public API
    def backward(self, losses: Sequence[Tensor], *, retain_graph: bool = False) -> None:
        """Add the method's combination of the task gradients to ``.grad``.

        Args:
            losses: one scalar loss per task (``num_tasks`` of them; if ``num_tasks`` was not
                given it is fixed by the first call).
            retain_graph: keep the autograd graph after the last task (default: freed).

        Raises:
            TypeError, ValueError: for a malformed loss list, a loss that reaches none of the
                optimizer's parameters, or (with ``error_if_nonfinite``) a non-finite loss or
                gradient. ``.grad`` and the method's state are unchanged then.
        """
        checked = self._check_losses(losses)
        values = torch.stack([loss.detach().reshape(()).double() for loss in checked]).cpu()
        finite = self._finite("losses", values)
        loss_values = values.numpy()
        self._check_values(loss_values)
        self._combine(checked, loss_values, finite, retain_graph)
        if self.num_tasks is None:
            self.num_tasks = len(checked)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The wrapped optimizer's step (then the method's own update, e.g. GradNorm's)."""
        loss = self._inner_step(closure)
        self._after_step()
        return loss

    # ------------------------------------------------------------------ subclass hooks
    def _combine(
        self, losses: list[Tensor], values: Array, finite: bool, retain_graph: bool
    ) -> None:
        """Write the combination of the (checked) ``losses``' gradients to ``.grad``."""
        raise NotImplementedError

    def _after_step(self) -> None:
        pass

    def _check_values(self, values: Array) -> None:
        """Raise if the method cannot take these loss values (GradNorm: negative ones)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any], num_tasks: int | None) -> Callable[[], None]:
        """Validate ``_extra_state`` (of ``num_tasks`` tasks, if known); return the function
        that restores it, which cannot fail."""
        return lambda: None

    # ------------------------------------------------------------------ internals
    def _check_losses(self, losses: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(
                f"losses must be a list or tuple of scalar tensors, got {type(losses).__name__}"
            )
        expected = self.num_tasks
        if len(losses) == 0 or (expected is not None and len(losses) != expected):
            wanted = "at least 1" if expected is None else str(expected)
            raise ValueError(f"losses must hold one loss per task ({wanted}), got {len(losses)}")
        for t, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(f"losses[{t}] must be a torch.Tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(
                    f"losses[{t}] must be a scalar (one element), got shape {tuple(loss.shape)}"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"losses[{t}] does not require grad, so it reaches none of the parameters"
                )
        return list(losses)

    def _finite(self, name: str, values: Tensor) -> bool:
        """Whether ``values`` are finite; raises if not and ``error_if_nonfinite``."""
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad and self.error_if_nonfinite:
            raise ValueError(
                f"{name} must be finite, got {values[bad[0]].item()} at {name}[{bad[0]}]; "
                f"nothing was updated{NONFINITE_HINT}"
            )
        return not bad

    # ------------------------------------------------------------------ state
    def _own_state_dict(self, packed: dict[str, Any]) -> None:
        """``packed["surgery"]``: ``num_tasks``, the RNG state and the method's own state."""
        packed["surgery"] = {
            "method": self._method_name(),
            "num_tasks": self.num_tasks,
            "rng_state": None if self.generator is None else self.generator.get_state(),
            "method_state": self._extra_state(),
        }

    def _method_name(self) -> str:
        """The library's class this optimizer is (or derives from): what its state means."""
        ours = [c for c in type(self).__mro__ if c.__module__.startswith(__package__ or "")]
        return ours[0].__name__

    def _prepare_load(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        own = state_dict.get("surgery")
        keys = {"method", "num_tasks", "rng_state", "method_state"}
        if not isinstance(own, dict) or not keys <= set(own):
            raise ValueError(
                f"state_dict['surgery'] must hold {sorted(keys)}: not a state_dict of "
                f"{type(self).__name__}"
            )
        if own["method"] != self._method_name():
            raise ValueError(
                f"state_dict was saved by {own['method']!r}, expected a state_dict of "
                f"{self._method_name()!r}"
            )
        num_tasks = own["num_tasks"]
        if num_tasks is not None:
            check_int("state_dict['surgery']['num_tasks']", num_tasks, 1)
        if self.num_tasks is not None and num_tasks is not None and num_tasks != self.num_tasks:
            raise ValueError(
                f"state_dict is for num_tasks={num_tasks}, this optimizer has {self.num_tasks}"
            )
        rng_state = own["rng_state"]
        if self.generator is not None and rng_state is not None:
            if not isinstance(rng_state, Tensor) or rng_state.dtype != torch.uint8:
                raise ValueError("state_dict['surgery']['rng_state'] must be a uint8 tensor")
        if not isinstance(own["method_state"], dict):
            raise ValueError("state_dict['surgery']['method_state'] must be a dict")
        tasks = num_tasks if num_tasks is not None else self.num_tasks
        restore = self._load_extra_state(own["method_state"], tasks)

        def commit() -> None:
            restore()
            if self.generator is not None and rng_state is not None:
                self.generator.set_state(rng_state)
            if num_tasks is not None:
                self.num_tasks = num_tasks

        inner = {k: v for k, v in state_dict.items() if k != "surgery"}
        return inner, commit


class GramianCombiner(GradientCombiner):
    """A method that weights the task gradients by a function of their Gramians.

    Subclasses implement ``_update`` (and optionally ``_blocks``,
    ``_head_scale``, ``_extra_state``, ``_load_extra_state``).
    """

    def _update(self, problem: TaskGramians) -> Array:
        """``(blocks, T)`` weights of this call; advances the method's state.

        Called once per ``backward``, after every check passed and only with finite
        gradients: this is where a method draws its random order (PCGrad, GradVac), moves
        its EMA targets (GradVac) or sets its task-weight gradient (GradNorm). The math is in
        the public pure functions (``pcgrad_weights``, ...).
        """
        raise NotImplementedError

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        """Block id of each shared parameter (given by its index in ``params()``)."""
        return [0] * len(indices), 1

    def _head_scale(self, task: int) -> float:
        return 1.0

    def _combine(
        self, losses: list[Tensor], values: Array, finite: bool, retain_graph: bool
    ) -> None:
        num_tasks = len(losses)
        indexed = [(i, p) for i, p in enumerate(self.params()) if p.requires_grad]
        params = [p for _, p in indexed]
        grads: list[list[Tensor | None]] = []
        for t, loss in enumerate(losses):
            keep = retain_graph or t < num_tasks - 1
            task_grads = torch.autograd.grad(
                loss, params, retain_graph=keep, allow_unused=True, materialize_grads=False
            )
            if all(g is None for g in task_grads):
                raise ValueError(
                    f"losses[{t}] reaches none of the optimizer's parameters; every loss must "
                    "depend on at least one parameter that requires grad"
                )
            grads.append(list(task_grads))
        reach = [
            [t for t in range(num_tasks) if grads[t][k] is not None] for k in range(len(params))
        ]
        shared = [k for k in range(len(params)) if len(reach[k]) >= 2]
        block_ids, num_blocks = self._blocks([indexed[k][0] for k in shared])
        block_of = dict(zip(shared, block_ids))
        grams = self._grams(grads, reach, shared, block_of, num_blocks, num_tasks)
        finite = finite and self._gradients_finite(grads, reach, grams)
        if not finite:  # only reached with error_if_nonfinite=False: the plain sum, no state
            self.last_weights = None
            self._write(params, grads, reach, block_of, np.ones((num_blocks, num_tasks)), 1.0)
            return
        reached = np.zeros((num_blocks, num_tasks), dtype=bool)
        for k in shared:
            reached[block_of[k], reach[k]] = True
        problem = TaskGramians(grams, reached, sorted(set(block_ids)), values)
        weights = np.asarray(self._update(problem), dtype=np.float64)
        self.last_weights = torch.from_numpy(weights.copy())
        self._write(params, grads, reach, block_of, weights, None)

    def _gradients_finite(
        self, grads: list[list[Tensor | None]], reach: list[list[int]], grams: Array
    ) -> bool:
        """Whether every task gradient is finite (shared ones via the Gramian's diagonal)."""
        bad = [t for t in range(grams.shape[-1]) if not np.isfinite(grams[:, t, t]).all()]
        for k, tasks in enumerate(reach):
            if len(tasks) == 1 and not bool(torch.isfinite(grads[tasks[0]][k]).all()):  # type: ignore[arg-type]
                bad.append(tasks[0])
        if bad and self.error_if_nonfinite:
            raise ValueError(
                f"the gradient of losses[{min(bad)}] is not finite; nothing was updated"
                f"{NONFINITE_HINT}"
            )
        return not bad

    @staticmethod
    def _grams(
        grads: list[list[Tensor | None]],
        reach: list[list[int]],
        shared: list[int],
        block_of: dict[int, int],
        num_blocks: int,
        num_tasks: int,
    ) -> Array:
        """``(blocks, T, T)`` float64 Gramians; at most about P/T elements per task at a time."""
        total = 0
        for k in shared:
            first = grads[reach[k][0]][k]
            assert first is not None
            total += first.numel()
        chunk = max(_MIN_CHUNK, total // max(2 * num_tasks, 1))
        per_device: dict[torch.device, Tensor] = {}
        for k in shared:
            tasks = reach[k]
            flats = [grads[t][k] for t in tasks]
            device = flats[0].device  # type: ignore[union-attr]
            if device not in per_device:
                per_device[device] = torch.zeros(
                    num_blocks, num_tasks, num_tasks, dtype=torch.float64, device=device
                )
            gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64, device=device)
            wide = flats[0].dtype in (torch.float64, torch.complex128)  # type: ignore[union-attr]
            products = torch.float64 if wide else torch.float32
            add_gramian_(gram, flats, chunk, products)  # type: ignore[arg-type]
            index = torch.tensor(tasks, device=device)
            per_device[device][block_of[k]].index_put_(
                (index[:, None], index[None, :]), gram, accumulate=True
            )
        out = np.zeros((num_blocks, num_tasks, num_tasks))
        for gram_d in per_device.values():
            out += gram_d.cpu().numpy()
        return out

    @torch.no_grad()
    def _write(
        self,
        params: list[Tensor],
        grads: list[list[Tensor | None]],
        reach: list[list[int]],
        block_of: dict[int, int],
        weights: Array,
        head_scale: float | None,
    ) -> None:
        """Add the combinations to ``.grad``; heads get ``head_scale`` (default: the method's)."""
        for k, param in enumerate(params):
            tasks = reach[k]
            if not tasks:
                continue
            out: Tensor | None = None
            if len(tasks) == 1:
                scale = self._head_scale(tasks[0]) if head_scale is None else head_scale
                grad = grads[tasks[0]][k]
                assert grad is not None
                out = grad if scale == 1.0 else grad * scale
            else:
                row = weights[block_of[k]]
                for t in tasks:
                    w = float(row[t])
                    grad = grads[t][k]
                    assert grad is not None
                    if w == 0.0:
                        continue
                    out = grad * w if out is None else out.add_(grad, alpha=w)
                if out is None:
                    out = torch.zeros_like(param)
            for t in tasks:  # free this parameter's per-task gradients as soon as possible
                grads[t][k] = None
            if param.grad is None:
                if out.stride() != param.stride():
                    out = torch.empty_like(param).copy_(out)
                param.grad = out
            else:
                param.grad.add_(out)
