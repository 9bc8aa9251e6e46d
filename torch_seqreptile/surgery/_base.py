"""Shared base of the multi-task gradient-combination optimizers (``torch_seqreptile.surgery``).

``backward(losses)`` takes one scalar loss per task and fills ``.grad``:

1. per-task gradients ``g_t = torch.autograd.grad(loss_t, params, allow_unused=True)``, one
   task at a time (the graph is retained until the last task);
2. a parameter is **shared** when two or more losses reach it (autograd returns a tensor, not
   ``None``, for it), **task-specific** (a head) when exactly one loss reaches it, unused when
   none does. A task that does not reach a shared parameter contributes zeros there;
3. per block of shared parameters (one block for most methods, one per layer for GradVac) the
   T×T Gramian ``G[i, j] = <g_i, g_j>`` is accumulated in float64, a parameter (or a bounded
   chunk of it) at a time;
4. the method turns the Gramians into weights ``W[block, t]`` (a small float64 problem on the
   CPU), and every shared parameter gets ``sum_t W[block, t] g_t``; a head gets its task's
   gradient (times :meth:`_head_scale`, 1 except for GradNorm); unused parameters keep their
   ``.grad``. Results are *added* to ``.grad`` like ``Tensor.backward`` does.

Peak extra memory is the T per-task gradients plus one parameter-sized output (per-task
gradients are freed parameter by parameter as the combined one is written), i.e. about
(T + 1) × the shared parameters; see ``docs/baselines.md`` for measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._validation import check_int
from torch_seqreptile._wrapper import OptimizerWrapper

Array = npt.NDArray[np.float64]

#: elements per stacked chunk when forming a Gramian, at least (bounded by shared size / T).
_MIN_CHUNK = 1 << 12


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


class GradientCombiner(OptimizerWrapper):
    """Wraps an optimizer; ``backward(losses)`` writes a combination of task gradients.

    Subclasses implement :meth:`_weights` (and optionally :meth:`_blocks`,
    :meth:`_head_scale`, :meth:`_extra_state`, :meth:`_load_extra_state`).
    """

    #: whether the method has a random task order (PCGrad, GradVac): a seeded generator
    uses_rng = False

    def __init__(
        self, optimizer: Optimizer, *, num_tasks: int | None = None, seed: int | None = None
    ) -> None:
        super().__init__(optimizer)
        self.num_tasks: int | None = (
            None if num_tasks is None else check_int("num_tasks", num_tasks, 1)
        )
        self.generator: torch.Generator | None = make_generator(seed) if self.uses_rng else None
        #: float64 ``(blocks, T)`` weights of the last ``backward`` (for inspection)
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _weights(self, grams: Array, active: list[int], losses: Array) -> Array:
        """``(blocks, T)`` weights from the ``(blocks, T, T)`` Gramians of the shared grads.

        ``active`` lists the blocks that hold a shared parameter this call; ``losses`` the
        detached loss values. May update the method's state (called after every check).
        """
        raise NotImplementedError

    def _blocks(self, indices: list[int]) -> tuple[list[int], int]:
        """Block id of each shared parameter (given by its index in ``params()``)."""
        return [0] * len(indices), 1

    def _head_scale(self, task: int) -> float:
        return 1.0

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> Callable[[], None]:
        """Validate :meth:`_extra_state`; return the function that restores it."""
        return lambda: None

    # ------------------------------------------------------------------ public API
    def backward(self, losses: Sequence[Tensor], *, retain_graph: bool = False) -> None:
        """Add the method's combination of the task gradients to ``.grad``.

        Args:
            losses: one scalar loss per task (``num_tasks`` of them; if ``num_tasks`` was not
                given it is fixed by the first call).
            retain_graph: keep the autograd graph after the last task (default: freed).

        Raises:
            TypeError, ValueError: for a malformed loss list, a non-finite loss or gradient,
                or a loss that reaches none of the optimizer's parameters. ``.grad`` and the
                method's state are unchanged then.
        """
        checked = self._check_losses(losses)
        values = torch.stack([loss.detach().reshape(()).double() for loss in checked]).cpu()
        self._check_finite("losses", values)
        num_tasks = len(checked)
        indexed = [(i, p) for i, p in enumerate(self.params()) if p.requires_grad]
        params = [p for _, p in indexed]
        grads: list[list[Tensor | None]] = []
        for t, loss in enumerate(checked):
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
        for t in range(num_tasks):
            if not np.isfinite(grams[:, t, t]).all():
                raise ValueError(f"the gradient of losses[{t}] is not finite; nothing was updated")
        heads = [k for k in range(len(params)) if len(reach[k]) == 1]
        for k in heads:
            if not bool(torch.isfinite(grads[reach[k][0]][k]).all()):  # type: ignore[arg-type]
                raise ValueError(
                    f"the gradient of losses[{reach[k][0]}] is not finite; nothing was updated"
                )
        active = sorted(set(block_ids))
        weights = self._weights(grams, active, values.numpy())
        if self.num_tasks is None:
            self.num_tasks = num_tasks
        self.last_weights = torch.from_numpy(np.array(weights, dtype=np.float64))
        self._write(params, grads, reach, block_of, weights)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The wrapped optimizer's step (then the method's own update, e.g. GradNorm's)."""
        loss = self._inner_step(closure)
        self._after_step()
        return loss

    def _after_step(self) -> None:
        pass

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

    @staticmethod
    def _check_finite(name: str, values: Tensor) -> None:
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name} must be finite, got {values[bad[0]].item()} at {name}[{bad[0]}]; "
                "nothing was updated"
            )

    @staticmethod
    def _grams(
        grads: list[list[Tensor | None]],
        reach: list[list[int]],
        shared: list[int],
        block_of: dict[int, int],
        num_blocks: int,
        num_tasks: int,
    ) -> Array:
        """``(blocks, T, T)`` float64 Gramians, stacking at most ``chunk`` elements per task."""
        total = 0
        for k in shared:
            first = grads[reach[k][0]][k]
            assert first is not None
            total += first.numel()
        chunk = max(_MIN_CHUNK, total // max(num_tasks, 1))
        per_device: dict[torch.device, Tensor] = {}
        for k in shared:
            tasks = reach[k]
            flats = [grads[t][k].reshape(-1) for t in tasks]  # type: ignore[union-attr]
            device = flats[0].device
            if device not in per_device:
                per_device[device] = torch.zeros(
                    num_blocks, num_tasks, num_tasks, dtype=torch.float64, device=device
                )
            gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64, device=device)
            for start in range(0, flats[0].numel(), chunk):
                rows = torch.stack([f[start : start + chunk] for f in flats])
                if rows.dtype in (torch.float16, torch.bfloat16):
                    rows = rows.float()
                gram += (rows @ rows.T).double()
                del rows
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
    ) -> None:
        for k, param in enumerate(params):
            tasks = reach[k]
            if not tasks:
                continue
            out: Tensor | None = None
            if len(tasks) == 1:
                scale = self._head_scale(tasks[0])
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
        restore = self._load_extra_state(own["method_state"])

        def commit() -> None:
            restore()
            if self.generator is not None and rng_state is not None:
                self.generator.set_state(rng_state)
            if num_tasks is not None:
                self.num_tasks = num_tasks

        inner = {k: v for k, v in state_dict.items() if k != "surgery"}
        return inner, commit
