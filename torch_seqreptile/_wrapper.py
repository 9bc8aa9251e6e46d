"""Base class of every optimizer in this package that wraps another ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class OptimizerWrapper(Optimizer):
    """A ``torch.optim.Optimizer`` that shares the wrapped optimizer's groups and state.

    ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's objects, so an
    LR scheduler, gradient clipping or a ``GradScaler`` acting on the wrapper acts on the
    inner optimizer. ``step`` pre/post hooks registered on the wrapper run around the
    wrapper's own ``step``.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        # Optimizer.__init__ would replace param_groups/state with new objects; set up only
        # its hook machinery, which is what makes the wrapper a full Optimizer.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._patch_step_function()

    # The wrapped optimizer's load_state_dict rebinds its attributes, so delegate on access.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> defaultdict[Tensor, Any]:
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def params(self) -> Iterator[Tensor]:
        """All parameters of all groups, in the order ``state_dict`` indexes them."""
        for group in self.param_groups:
            yield from group["params"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def _check_state_dict_kind(self, state_dict: dict[str, Any]) -> None:
        kind = state_dict.get("wrapper") if isinstance(state_dict, dict) else None
        if kind != type(self).__name__:
            raise ValueError(
                f"state_dict was saved by {kind!r}, expected a state_dict of {type(self).__name__}"
            )
        shapes = [list(p.shape) for p in self.params()]
        if state_dict.get("param_shapes") != shapes:
            raise ValueError(
                "state_dict belongs to a different set of parameters: expected "
                f"{len(shapes)} parameters with shapes {shapes[:4]}..., got "
                f"{len(state_dict.get('param_shapes') or [])} parameters"
            )

    def _base_state_dict(self) -> dict[str, Any]:
        return {
            "wrapper": type(self).__name__,
            "param_shapes": [list(p.shape) for p in self.params()],
            "inner": self.optimizer.state_dict(),
        }


@torch.no_grad()
def clone_to(tensor: Tensor, device: torch.device | None) -> Tensor:
    """A detached copy of ``tensor`` (on ``device`` if given), keeping its dtype and layout."""
    return tensor.detach().to(device=device or tensor.device, copy=True)
