"""Base class of every optimizer in this package that wraps another ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import required

from torch_seqreptile._state_view import StateView

#: instance attributes that schedulers (``step``, ``_opt_called``) and accelerate set
_PATCHED_BY_USERS = frozenset({"step", "_opt_called", "zero_grad"})


class OptimizerWrapper(Optimizer):
    """A ``torch.optim.Optimizer`` around another one, sharing its parameter groups.

    * ``param_groups`` *is* the wrapped optimizer's list (read through on every access, so it
      survives the wrapped optimizer's ``load_state_dict``): an LR scheduler, gradient
      clipping or a ``GradScaler`` acting on the wrapper acts on the inner optimizer. The
      wrapper's own hyperparameters are extra keys of those groups (``defaults`` lists them
      beside the inner optimizer's).
    * ``state[p]`` is a live view of the parameter's whole state: the inner optimizer's
      entries (kept in ``optimizer.state``, so that the inner optimizer sees only its own)
      beside the wrapper's (kept in ``_own_state``); reads and writes go to the key's owner.
      ``state_dict()`` merges both in torch's layout
      ``{"state": {index: {...}}, "param_groups": [...]}``.
    * Step and state-dict hooks registered on the wrapper fire once per call; the global
      step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire for the
      wrapper only, not a second time for the inner step.
    * ``copy.deepcopy`` and ``pickle`` copy the inner optimizer along (hooks are not copied,
      as for every ``torch.optim.Optimizer``).
    """

    #: the wrapper's own hyperparameters and their defaults (keys of every param group)
    _own_defaults: dict[str, Any]

    def __init__(self, optimizer: Optimizer, own_defaults: dict[str, Any] | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        own_defaults = dict(own_defaults or {})
        clash = sorted(set(optimizer.defaults) & set(own_defaults))
        if clash:
            raise ValueError(
                f"optimizer already has the hyperparameter(s) {clash}, which "
                f"{type(self).__name__} keeps in the same param groups"
            )
        self.optimizer = optimizer
        self._own_defaults = own_defaults
        self._own_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        groups = list(optimizer.param_groups)
        # Optimizer.__init__ empties param_groups (here: the inner optimizer's list) and adds
        # every group again through add_param_group, which fills in the wrapper's keys.
        super().__init__(groups, {**optimizer.defaults, **self._own_defaults})

    # Read through: the wrapped optimizer's load_state_dict rebinds its list.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> StateView:
        return StateView(
            self._own_state,
            self.optimizer.state,
            self._own_keys(),
            self._check_own_state,
            self._state_changed,
        )

    @state.setter
    def state(self, value: Mapping[Any, Mapping[str, Any]]) -> None:
        """Replace the whole state, the inner optimizer's included (``Optimizer.__init__``
        assigns an empty one: that must keep the inner state, e.g. RecAdam's anchors)."""
        entries = dict(value.items())
        if entries or self._own_state:
            self.optimizer.state.clear()
        self._own_state = defaultdict(dict)
        view = self.state
        for param, entry in entries.items():
            view[param] = entry
        self._state_changed()

    def _own_keys(self) -> frozenset[str]:
        """Per-parameter state keys that belong to the wrapper."""
        return frozenset()

    def _check_own_state(self, param: Tensor, key: str, value: Any) -> None:
        """Raise if ``value`` cannot be the wrapper's ``state[param][key]``."""

    def _state_changed(self) -> None:
        """Called after the state was changed through :attr:`state`."""

    def params(self) -> Iterator[Tensor]:
        """All parameters of all groups, in the order ``state_dict`` indexes them."""
        for group in self.param_groups:
            yield from group["params"]

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """Raise ``TypeError``/``ValueError`` for an invalid value of the wrapper's keys.

        Errors name ``where[key]`` (e.g. ``param_groups[1]['outer_lr']``), or the
        constructor's argument when ``where`` is empty.
        """

    def _check_new_group(self, group: dict[str, Any]) -> None:
        """Raise if ``group`` cannot join the existing groups (Reptile: one schedule)."""

    def _init_group(self, group: dict[str, Any]) -> None:
        """Set the wrapper's per-group counters of a group just added."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer, with the wrapper's hyperparameters filled in.

        Raises ``TypeError``/``ValueError`` before anything changes if a value is invalid.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set, list)):
            param_group["params"] = list(params)  # a generator: the checks must not consume it
        defaults = {k: v for k, v in self.defaults.items() if v is not required}
        candidate = {**defaults, **param_group}
        self._check_group(candidate, f"param_groups[{len(self.param_groups)}]")
        self._check_new_group(candidate)
        for name, value in defaults.items():  # opt.defaults, edits included, as torch reads it
            param_group.setdefault(name, value)
        self.optimizer.add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ step
    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        return unhooked_step(self.optimizer, closure)

    # ------------------------------------------------------------------ copy, pickle, repr
    def __getstate__(self) -> dict[str, Any]:
        # Like Optimizer.__getstate__, leave out what belongs to the optimizer's users: hooks
        # (often lambdas) and what an LR scheduler or accelerate patches onto the instance
        # (``step``, a wrapper holding a weak reference to this very optimizer, and
        # ``_opt_called``). Unlike it, keep every other attribute, the inner optimizer too.
        return {
            k: v
            for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in _PATCHED_BY_USERS
        }

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({type(self.optimizer).__name__}) ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines += [f"    {k}: {group[k]}" for k in sorted(group) if k != "params"]
        return "\n".join(lines) + "\n)"

    # ------------------------------------------------------------------ state
    def _own_state_dict(self, packed: dict[str, Any]) -> None:
        """Add the wrapper's state to ``packed`` (the inner optimizer's state dict)."""

    def _prepare_load(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Validate ``state_dict``; return the inner optimizer's part and the commit step.

        Raises before anything changes; the commit step cannot fail.
        """
        return state_dict, lambda: None

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` with the wrapper's state merged in.

        torch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``; every value is a
        tensor, number, string, list or dict, so it loads with ``torch.load(weights_only=True)``
        and survives a ``torch.distributed.checkpoint`` round trip.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        self._own_state_dict(state_dict)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Everything is validated first (layout, parameter count and shapes, every value of the
        wrapper's hyperparameters and state); on any error ``TypeError``/``ValueError`` is
        raised and the optimizer is left exactly as it was.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_layout(state_dict, self.param_groups)
        inner_state_dict, commit = self._prepare_load(state_dict)
        self.optimizer.load_state_dict(inner_state_dict)
        commit()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def unhooked_step(optimizer: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``optimizer.step(closure)`` without its step hooks: a step inside the wrapper's own.

    ``Optimizer`` wraps every subclass's ``step`` so that it runs the global and the
    instance's step hooks; the wrapper's ``step`` has already run the global ones, which must
    fire once per step the user takes.
    """
    step = type(optimizer).step
    return getattr(step, "__wrapped__", step)(optimizer, closure)


def check_layout(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has torch's layout and matches ``groups``."""
    if "wrapper" in state_dict or "inner" in state_dict:
        raise ValueError(
            "state_dict is in the torch_seqreptile 0.1 format (keys 'wrapper', 'inner'); "
            "0.2 uses torch's layout {'state', 'param_groups'} and cannot read it: resume "
            "from a checkpoint written by 0.2"
        )
    for key, kind in (("state", dict), ("param_groups", list)):
        if not isinstance(state_dict.get(key), kind):
            raise ValueError(f"state_dict[{key!r}] must be a {kind.__name__}")
    saved = state_dict["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(
            f"state_dict has {len(saved)} parameter groups, this optimizer has {len(groups)}"
        )
    listed = set()
    for index, (saved_group, group) in enumerate(zip(saved, groups)):
        ids = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            raise ValueError(
                f"state_dict['param_groups'][{index}] must list {len(group['params'])} "
                f"parameters, got {None if ids is None else len(ids)}"
            )
        listed.update(ids)
    for pid in state_dict["state"]:
        # torch passes keys that are not parameter ids (a hook's) through unchanged
        if isinstance(pid, int) and pid not in listed:
            raise ValueError(
                f"state_dict['state'][{pid!r}] is for a parameter id that no param group lists"
            )


def saved_id_map(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[Any, Tensor]:
    """The parameter of each id in ``state_dict['param_groups']`` (as ``Optimizer`` zips them)."""
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in groups for p in group["params"]]
    return dict(zip(ids, params))


@torch.no_grad()
def clone_to(
    tensor: Tensor, device: torch.device | None, dtype: torch.dtype | None = None
) -> Tensor:
    """A detached copy of ``tensor`` on ``device``/``dtype`` (default: its own)."""
    return tensor.detach().to(device=device or tensor.device, dtype=dtype, copy=True)
