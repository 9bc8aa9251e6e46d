"""Slow weights (phi), the outer update and their state: the part SeqReptile and Reptile share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._interpolate import OUTER_IMPLS, outer_update_
from torch_seqreptile._validation import check_float, check_int
from torch_seqreptile._wrapper import OptimizerWrapper, clone_to
from torch_seqreptile.distributed import local_tensor


class SlowWeightsOptimizer(OptimizerWrapper):
    """Keeps a slow copy phi of the parameters and moves it toward the fast weights theta.

    Subclasses decide *when* an outer update happens and *what* phi moves toward; this class
    owns phi, the optional outer momentum buffers, the kernels and the serialised state.

    Slow copies are created lazily, for a parameter the first time it has a gradient when
    ``step`` is called: until then the inner optimizer has never changed it, so its current
    value is still phi. Frozen parameters therefore cost no memory.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        inner_steps: int,
        outer_lr: float,
        *,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        reset_inner_state: bool = False,
        slow_device: torch.device | str | None = None,
        outer_impl: str = "foreach",
        reject_nonfinite: bool = False,
    ) -> None:
        super().__init__(optimizer)
        self.inner_steps = check_int("inner_steps", inner_steps, 1)
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0, 1.0, open_high=False)
        self.outer_momentum = check_float(
            "outer_momentum", outer_momentum, 0.0, 1.0, open_high=True
        )
        if nesterov and self.outer_momentum == 0.0:
            raise ValueError("nesterov=True requires outer_momentum > 0")
        if outer_impl not in OUTER_IMPLS:
            raise ValueError(f"outer_impl must be one of {OUTER_IMPLS}, got {outer_impl!r}")
        self.nesterov = bool(nesterov)
        self.reset_inner_state = bool(reset_inner_state)
        self.slow_device = None if slow_device is None else torch.device(slow_device)
        self.outer_impl = outer_impl
        self.reject_nonfinite = bool(reject_nonfinite)
        self.slow: dict[int, Tensor] = {}
        self.outer_buffers: dict[int, Tensor] = {}
        self.num_steps = 0  # inner steps taken in total
        self.trajectory_step = 0  # inner steps since the last outer update
        self._untracked = list(range(sum(1 for _ in self.params())))

    # ------------------------------------------------------------------ hooks for subclasses
    def _on_track(self, index: int, param: Tensor) -> None:
        """Called when parameter ``index`` gets its slow copy (Reptile sizes its buffers)."""

    def _after_inner_step(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one inner step with the wrapped optimizer; do the outer update when due."""
        if self._untracked:
            self._track_new_params()
        if self.reject_nonfinite:
            self._check_finite_grads()
        loss = self.optimizer.step(closure)
        self.num_steps += 1
        self.trajectory_step += 1
        self._after_inner_step()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        num_before = sum(1 for _ in self.params())
        super().add_param_group(param_group)
        self._untracked.extend(range(num_before, sum(1 for _ in self.params())))

    @contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Put phi into the parameters for the ``with`` block, then restore theta.

        Use it to evaluate or save the weights the method keeps without ending the inner
        trajectory. Costs one temporary copy of the tracked parameters.
        """
        _, slow, fast = self._tracked()
        with torch.no_grad():
            backup = [f.detach().clone() for f in fast]
            for f, s in zip(fast, slow):
                f.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for f, b in zip(fast, backup):
                    f.copy_(b)

    # ------------------------------------------------------------------ internals
    def _tracked(self) -> tuple[list[int], list[Tensor], list[Tensor]]:
        params = list(self.params())
        indices = sorted(self.slow)
        return indices, [self.slow[i] for i in indices], [params[i] for i in indices]

    def _track_new_params(self) -> None:
        params = list(self.params())
        still_untracked = []
        for index in self._untracked:
            param = params[index]
            if param.grad is None:
                still_untracked.append(index)
                continue
            self.slow[index] = clone_to(param, self.slow_device)
            self._on_track(index, param)
        self._untracked = still_untracked

    def _check_finite_grads(self) -> None:
        for index, param in enumerate(self.params()):
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                raise ValueError(
                    f"gradient of parameter {index} (shape {tuple(param.shape)}) is not finite; "
                    "reject_nonfinite=True refuses the step (nothing was updated)"
                )

    def _outer_update(self, target: dict[int, Tensor] | None) -> None:
        """phi <- phi - outer_lr * (phi - target); theta <- phi (Alg. 1 lines 9-10).

        ``target`` None means the fast weights themselves (SeqReptile).
        """
        indices, slow, fast = self._tracked()
        if self.outer_momentum > 0.0:
            for i in indices:
                if i not in self.outer_buffers:
                    self.outer_buffers[i] = torch.zeros_like(self.slow[i])
        buffers = [self.outer_buffers[i] for i in indices] if self.outer_momentum > 0 else []
        targets = fast if target is None else [target[i] for i in indices]
        # FSDP2 (DTensor) parameters: update the local shards, which share one sharding.
        outer_update_(
            [local_tensor(t) for t in slow],
            [local_tensor(t) for t in targets],
            [local_tensor(t) for t in fast],
            [local_tensor(t) for t in buffers],
            outer_lr=self.outer_lr,
            momentum=self.outer_momentum,
            nesterov=self.nesterov,
            impl=self.outer_impl,
        )
        self.trajectory_step = 0
        if self.reset_inner_state:
            self.optimizer.state.clear()

    @torch.no_grad()
    def _restart_trajectory(self) -> None:
        """theta <- phi without moving phi (start of another task's trajectory in Reptile)."""
        _, slow, fast = self._tracked()
        for f, s in zip(fast, slow):
            f.copy_(s, non_blocking=True)
        self.trajectory_step = 0
        if self.reset_inner_state:
            self.optimizer.state.clear()

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return {
            "inner_steps": self.inner_steps,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "nesterov": self.nesterov,
            "reset_inner_state": self.reset_inner_state,
        }

    def state_dict(self) -> dict[str, Any]:
        """Inner state, phi and outer buffers keyed by parameter index, counters, config.

        Every value is a tensor, number, string, list or dict, so the result loads with
        ``torch.load(path, weights_only=True)``.
        """
        state = self._base_state_dict()
        state.update(
            slow=dict(self.slow),
            outer_buffers=dict(self.outer_buffers),
            num_steps=self.num_steps,
            trajectory_step=self.trajectory_step,
            config=self._config(),
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``; raises ``ValueError`` and changes nothing on a mismatch."""
        self._check_state_dict_kind(state_dict)
        params = list(self.params())
        for key in ("slow", "outer_buffers"):
            for index, tensor in state_dict[key].items():
                if not 0 <= int(index) < len(params) or tensor.shape != params[index].shape:
                    raise ValueError(f"state_dict[{key!r}][{index}] does not match parameter")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.slow = {
            int(i): clone_to(t.to(params[int(i)].dtype), self.slow_device or params[int(i)].device)
            for i, t in state_dict["slow"].items()
        }
        self.outer_buffers = {
            int(i): clone_to(t.to(params[int(i)].dtype), self.slow[int(i)].device)
            for i, t in state_dict["outer_buffers"].items()
        }
        self._untracked = [i for i in range(len(params)) if i not in self.slow]
        self.num_steps = int(state_dict["num_steps"])
        self.trajectory_step = int(state_dict["trajectory_step"])
        for name, value in state_dict["config"].items():
            setattr(self, name, value)
