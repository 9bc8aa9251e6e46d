"""Slow weights (phi), the outer update and their state: the part SeqReptile and Reptile share."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._interpolate import OUTER_IMPLS, copy_weights_, outer_update_
from torch_seqreptile._validation import check_bool, check_float, check_int
from torch_seqreptile._wrapper import OptimizerWrapper, clone_to, saved_id_map
from torch_seqreptile.distributed import local_tensor

#: keys of the wrapper's entries in ``state[p]`` (and in ``state_dict()["state"][i]``)
SLOW_WEIGHT = "slow_weight"
OUTER_BUFFER = "outer_momentum_buffer"

_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: constructor argument of each param-group key whose name differs
_ARGUMENT_OF = {"outer_nesterov": "nesterov"}


_NOT_A_TENSOR = "must be a floating-point tensor"


def _state_tensor_problem(value: Any, param: Tensor) -> str | None:
    """What makes ``value`` unfit as phi (or an outer buffer) of ``param``, or ``None``."""
    if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
        return _NOT_A_TENSOR
    if value.shape != param.shape:
        return f"must have its parameter's shape {tuple(param.shape)}, got {tuple(value.shape)}"
    return None


def _keys_of_all_wrappers() -> set[str]:
    """Every group and state key of SlowWeightsOptimizer and its subclasses."""
    keys: set[str] = set()
    classes: list[type[SlowWeightsOptimizer]] = [SlowWeightsOptimizer]
    while classes:
        cls = classes.pop()
        keys.update(cls._hyperparameters, cls._counters, cls._state_keys)
        classes.extend(cls.__subclasses__())
    return keys


class SlowWeightsOptimizer(OptimizerWrapper):
    """Keeps a slow copy phi of the parameters and moves it toward the fast weights theta.

    Subclasses decide *when* an outer update happens and *what* phi moves toward; this class
    owns phi, the optional outer momentum buffers, the kernels and the serialised state.

    State, in torch's layout: ``state[p]`` holds ``slow_weight`` (phi) and, with outer
    momentum, ``outer_momentum_buffer``; every param group holds the outer hyperparameters
    (``inner_steps``, ``outer_lr``, ``outer_momentum``, ``outer_nesterov``,
    ``reset_inner_state``)
    and the counter ``trajectory_step`` (inner steps since the group's last outer update).

    Slow copies are created lazily, for a parameter the first time it has a gradient when
    ``step`` is called: until then the inner optimizer has never changed it, so its current
    value is still phi. Frozen parameters therefore cost no memory.
    """

    #: per-parameter state keys owned by the wrapper
    _state_keys: tuple[str, ...] = (SLOW_WEIGHT, OUTER_BUFFER)
    #: per-group counters owned by the wrapper (besides its hyperparameters)
    _counters: tuple[str, ...] = ("trajectory_step",)
    #: per-group hyperparameters owned by the wrapper
    _hyperparameters: tuple[str, ...] = (
        "inner_steps",
        "outer_lr",
        "outer_momentum",
        "outer_nesterov",
        "reset_inner_state",
    )

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
        slow_dtype: torch.dtype | None = None,
        outer_impl: str = "foreach",
        reject_nonfinite: bool = False,
        extra_defaults: dict[str, Any] | None = None,
    ) -> None:
        defaults = {
            "inner_steps": inner_steps,
            "outer_lr": outer_lr,
            "outer_momentum": outer_momentum,
            "outer_nesterov": nesterov,
            "reset_inner_state": reset_inner_state,
            **(extra_defaults or {}),
        }
        self._check_group(defaults, "")
        if outer_impl not in OUTER_IMPLS:
            raise ValueError(f"outer_impl must be one of {OUTER_IMPLS}, got {outer_impl!r}")
        if slow_dtype is not None and (
            not isinstance(slow_dtype, torch.dtype) or not slow_dtype.is_floating_point
        ):
            raise TypeError(
                f"slow_dtype must be a floating torch.dtype or None, got {slow_dtype!r}"
            )
        self.slow_device = None if slow_device is None else torch.device(slow_device)
        self.slow_dtype = slow_dtype
        self.outer_impl = outer_impl
        self.reject_nonfinite = check_bool("reject_nonfinite", reject_nonfinite)
        # (param, group index) of the parameters without a slow copy yet; None: recompute
        self._untracked: list[tuple[Tensor, int]] | None = None
        self._num_params = -1
        super().__init__(optimizer, defaults)

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict[str, Any], where: str) -> None:
        def name(key: str) -> str:
            return f"{where}[{key!r}]" if where else _ARGUMENT_OF.get(key, key)

        check_int(name("inner_steps"), group["inner_steps"], 1)
        check_float(name("outer_lr"), group["outer_lr"], 0.0, 1.0, open_high=False)
        momentum = check_float(
            name("outer_momentum"), group["outer_momentum"], 0.0, 1.0, open_high=True
        )
        if check_bool(name("outer_nesterov"), group["outer_nesterov"]) and momentum == 0.0:
            raise ValueError(f"{name('outer_nesterov')}=True requires outer_momentum > 0")
        check_bool(name("reset_inner_state"), group["reset_inner_state"])

    def _check_counters(self, group: dict[str, Any], where: str) -> None:
        for key in self._counters:
            check_int(f"{where}[{key!r}]", group[key], 0)

    def _init_group(self, group: dict[str, Any]) -> None:
        group["trajectory_step"] = 0

    def _checked_groups(self) -> list[dict[str, Any]]:
        """The param groups, each validated (a user or scheduler may have changed them).

        A group added to the inner optimizer directly gets the wrapper's defaults first.
        """
        groups = self.param_groups
        for index, group in enumerate(groups):
            if "trajectory_step" not in group:
                for key, value in self._own_defaults.items():
                    group.setdefault(key, value)
                self._init_group(group)
            self._check_group(group, f"param_groups[{index}]")
            self._check_counters(group, f"param_groups[{index}]")
        return groups

    # ------------------------------------------------------------------ hooks for subclasses
    def _after_inner_step(self, groups: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _new_state(self, param: Tensor, slow: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The state of a parameter getting its slow copy ``slow`` now."""
        entry = {SLOW_WEIGHT: slow}
        if group["outer_momentum"] > 0.0:
            entry[OUTER_BUFFER] = torch.zeros_like(slow)
        return entry

    # ------------------------------------------------------------------ public API
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one inner step with the wrapped optimizer; do the outer update when due.

        With a ``closure`` the new parameters are tracked (and, with ``reject_nonfinite``,
        the gradients checked) right after its first evaluation, before the inner optimizer
        changes any weight — exactly as on the plain path ``loss.backward(); step()``.
        """
        groups = self._checked_groups()
        if closure is None:
            self._before_inner_step()
            loss = self._inner_step(None)
        else:
            prepared = False

            def closure_then_prepare() -> Any:
                nonlocal prepared
                value = closure()
                if not prepared:
                    prepared = True
                    self._before_inner_step()
                return value

            loss = self._inner_step(closure_then_prepare)
            if not prepared:  # an inner optimizer that ignores its closure
                self._before_inner_step()
        self._count_and_update(groups)
        return loss

    # Under torch.compile of a training step only the inner step is traced: the slow-weight
    # bookkeeping (tensor-keyed state, new entries, rare outer updates) runs eagerly.
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _count_and_update(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            group["trajectory_step"] += 1
        self._after_inner_step(groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._untracked = None

    @contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Put phi into the parameters for the ``with`` block, then restore theta.

        Use it to evaluate or save the weights the method keeps without ending the inner
        trajectory. Costs one temporary copy of the tracked parameters.
        """
        fast = self._tracked()
        slow = [self._own_state[p][SLOW_WEIGHT] for p in fast]
        with torch.no_grad():
            backup = [f.detach().clone() for f in fast]
            copy_weights_(fast, slow)
        try:
            yield
        finally:
            copy_weights_(fast, backup)

    # ------------------------------------------------------------------ internals
    def _own_keys(self) -> frozenset[str]:
        return frozenset(self._state_keys)

    def _is_tracked(self, param: Tensor) -> bool:
        """Whether ``param`` has its slow copy (reading ``state[p]`` may leave an empty entry)."""
        return SLOW_WEIGHT in self._own_state.get(param, ())

    def _tracked(self, params: Iterable[Tensor] | None = None) -> list[Tensor]:
        """The parameters (of ``params``, default all) that have a slow copy, in order."""
        return [p for p in (self.params() if params is None else params) if self._is_tracked(p)]

    def _check_own_state(self, param: Tensor, key: str, value: Any) -> None:
        problem = _state_tensor_problem(value, param)
        if problem is not None:
            raise (TypeError if problem == _NOT_A_TENSOR else ValueError)(
                f"state[p][{key!r}] {problem}"
            )

    def _state_changed(self) -> None:
        self._untracked = None  # a parameter may have lost (or got) its slow copy

    def _slow_dtype(self, param: Tensor) -> torch.dtype:
        if self.slow_dtype is None:
            return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
        return self.slow_dtype.to_complex() if param.is_complex() else self.slow_dtype

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _before_inner_step(self) -> None:
        if self.reject_nonfinite:
            self._check_finite_grads()
        self._track_new_params()

    def _track_new_params(self) -> None:
        groups = self.param_groups
        num_params = sum(len(g["params"]) for g in groups)
        if self._untracked is None or num_params != self._num_params:
            self._num_params = num_params
            self._untracked = [
                (p, gi)
                for gi, g in enumerate(groups)
                for p in g["params"]
                if not self._is_tracked(p)
            ]
        if not self._untracked:
            return
        still_untracked = []
        for param, group_index in self._untracked:
            if param.grad is None:
                still_untracked.append((param, group_index))
                continue
            self._track(param, groups[group_index])
        self._untracked = still_untracked

    def _track(self, param: Tensor, group: dict[str, Any]) -> None:
        """Give ``param`` its slow copy phi = its value now (and the rest of its state)."""
        slow = clone_to(param, self.slow_device, self._slow_dtype(param))
        self._own_state[param] = self._new_state(param, slow, group)

    def _check_finite_grads(self) -> None:
        """One host-device synchronisation per device: all gradients finite, or raise."""
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for param in self.params():
            if param.grad is not None and param.grad.device.type != "meta":
                by_device[param.grad.device].append(param.grad)
        for grads in by_device.values():
            if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                continue
            for index, param in enumerate(self.params()):
                grad = param.grad
                if grad is None or grad.device.type == "meta":
                    continue
                if not bool(torch.isfinite(grad).all()):
                    raise ValueError(
                        f"gradient of parameter {index} (shape {tuple(param.shape)}) is not "
                        "finite; reject_nonfinite=True refuses the step (nothing was updated)"
                    )

    def _outer_update(self, group: dict[str, Any], targets: list[Tensor] | None) -> None:
        """phi <- phi - outer_lr * (phi - target); theta <- phi (Alg. 1 lines 9-10), one group.

        ``targets`` None means the fast weights themselves (SeqReptile); otherwise one target
        per tracked parameter of the group, in the group's order.
        """
        fast = self._tracked(group["params"])
        slow = [self._own_state[p][SLOW_WEIGHT] for p in fast]
        momentum = group["outer_momentum"]
        buffers = []
        for p, s in zip(fast, slow):
            entry = self._own_state[p]
            if momentum == 0.0:
                entry.pop(OUTER_BUFFER, None)  # momentum switched off: its history goes
            elif OUTER_BUFFER in entry:
                buffers.append(entry[OUTER_BUFFER])
            else:  # momentum switched on during training
                entry[OUTER_BUFFER] = torch.zeros_like(s)
                buffers.append(entry[OUTER_BUFFER])
        # FSDP2 (DTensor) parameters: update the local shards, which share one sharding.
        outer_update_(
            [local_tensor(t) for t in slow],
            [local_tensor(t) for t in (fast if targets is None else targets)],
            [local_tensor(t) for t in fast],
            [local_tensor(t) for t in buffers],
            outer_lr=group["outer_lr"],
            momentum=momentum,
            nesterov=group["outer_nesterov"],
            impl=self.outer_impl,
        )
        self._end_trajectory(group)

    def _end_trajectory(self, group: dict[str, Any]) -> None:
        group["trajectory_step"] = 0
        if group["reset_inner_state"]:
            # Keep what the inner optimizer declares part of its set-up (RecAdam's anchors).
            keep = getattr(self.optimizer, "persistent_state_keys", ())
            for param in group["params"]:
                entry = self.optimizer.state.pop(param, None)
                kept = {k: v for k, v in (entry or {}).items() if k in keep}
                if kept:
                    self.optimizer.state[param] = kept

    def _restart_trajectory(self, groups: list[dict[str, Any]]) -> None:
        """theta <- phi without moving phi (start of another task's trajectory in Reptile)."""
        fast = self._tracked()
        copy_weights_(
            [local_tensor(p) for p in fast],
            [local_tensor(self._own_state[p][SLOW_WEIGHT]) for p in fast],
        )
        for group in groups:
            self._end_trajectory(group)

    # ------------------------------------------------------------------ state
    @property
    def trajectory_step(self) -> int:
        """Inner steps since the last outer update (of the first param group)."""
        return int(self.param_groups[0]["trajectory_step"])

    def _own_state_dict(self, packed: dict[str, Any]) -> None:
        id_of = {id(p): i for i, p in saved_id_map(packed, self.param_groups).items()}
        for param, entry in self._own_state.items():
            if not entry:  # an empty entry left by a read of the defaultdict
                continue
            index = id_of[id(param)]
            inner = packed["state"].get(index, {})
            clash = set(inner) & set(entry)
            if clash:
                raise RuntimeError(
                    f"the inner optimizer's state uses the key(s) {sorted(clash)}, which "
                    f"{type(self).__name__} needs for its own state"
                )
            packed["state"][index] = {**inner, **entry}

    def _check_saved_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        """Checks across the loaded groups (Reptile: they must agree)."""

    def _prepare_load(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        saved_groups = state_dict["param_groups"]
        own_keys = {*self._own_defaults, *self._counters, *self._state_keys}
        foreign = _keys_of_all_wrappers() - own_keys - set(self.optimizer.defaults)
        entries = [e for e in state_dict["state"].values() if isinstance(e, dict)]
        for index, saved in enumerate(saved_groups):
            where = f"state_dict['param_groups'][{index}]"
            missing = sorted(k for k in own_keys - set(self._state_keys) if k not in saved)
            if missing:
                raise ValueError(
                    f"{where} lacks {missing}: not a state_dict of {type(self).__name__}"
                )
        alien = sorted(foreign & {k for d in [*saved_groups, *entries] for k in d})
        if alien:
            raise ValueError(
                f"state_dict has {alien}, which {type(self).__name__} does not use: it was "
                "saved by another meta-optimizer"
            )
        for index, saved in enumerate(saved_groups):
            where = f"state_dict['param_groups'][{index}]"
            self._check_group(saved, where)
            self._check_counters(saved, where)
        self._check_saved_groups(saved_groups)
        id_map = saved_id_map(state_dict, self.param_groups)
        group_of = {i: g for g in saved_groups for i in g["params"]}
        own_state: dict[Tensor, dict[str, Tensor]] = {}
        inner_state: dict[Any, Any] = {}
        for pid, entry in state_dict["state"].items():
            where = f"state_dict['state'][{pid!r}]"
            if pid not in id_map:  # not a parameter's state (see check_layout)
                if isinstance(entry, dict) and set(entry) & set(self._state_keys):
                    raise ValueError(
                        f"{where} holds {sorted(set(entry) & set(self._state_keys))} but "
                        "is not a parameter id of the param groups (ids are ints)"
                    )
                inner_state[pid] = entry
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
            rest = {k: v for k, v in entry.items() if k not in self._state_keys}
            if rest:
                inner_state[pid] = rest
            ours = {k: entry[k] for k in self._state_keys if k in entry}
            if ours:
                own_state[id_map[pid]] = self._load_param_state(
                    ours, id_map[pid], group_of[pid], where
                )

        def commit() -> None:
            self._own_state = defaultdict(dict, own_state)
            self._untracked = None

        return {**state_dict, "state": inner_state}, commit

    def _required_state_keys(self, group: dict[str, Any]) -> set[str]:
        return {SLOW_WEIGHT}

    def _load_param_state(
        self, entry: dict[str, Any], param: Tensor, group: dict[str, Any], where: str
    ) -> dict[str, Tensor]:
        """Validated copies of one parameter's saved state, on its device and dtype."""
        missing = self._required_state_keys(group) - set(entry)
        if missing:
            raise ValueError(f"{where} has {sorted(entry)} but lacks {sorted(missing)}")
        loaded = {}
        for key, value in entry.items():
            problem = _state_tensor_problem(value, param)
            if problem is not None:
                raise ValueError(f"{where}[{key!r}] {problem}")
            device = self.slow_device or param.device
            loaded[key] = clone_to(value, device, self._slow_dtype(param))
        return loaded
