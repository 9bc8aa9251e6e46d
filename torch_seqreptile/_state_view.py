"""``optimizer.state`` of a wrapper: one live view over the wrapper's and the inner state.

The inner optimizer keeps its per-parameter entries in its own ``state`` (so that, e.g.,
Adam's ``len(state) == 0`` lazy initialisation still works); the wrapper keeps its own
(phi, ...) apart. Clients read and write ``wrapper.state[p][key]`` as for any optimizer
(``torch.distributed.checkpoint`` reads the keys, Lightning and users move tensors between
devices), and each key goes to its owner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from torch import Tensor

Store = MutableMapping[Any, Any]


class ParamState(MutableMapping[str, Any]):
    """Live view of one parameter's state: the wrapper's keys in its store, the rest in the
    inner optimizer's. Built from a plain mapping alone (as ``type(v)(mapping)`` does, e.g.
    in Lightning's ``apply_to_collection``) it is a detached dict-like copy."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, view: StateView | None = None,
                 param: Tensor | None = None) -> None:  # fmt: skip
        self._view, self._param = view, param
        self._detached: dict[str, Any] = dict(data or {})

    def _owner(self, key: str) -> Store:
        """The state (the wrapper's or the inner optimizer's) that holds ``key``."""
        assert self._view is not None
        return self._view.own if key in self._view.own_keys else self._view.inner

    def _store(self, key: str, create: bool) -> dict[str, Any]:
        if self._view is None:
            return self._detached
        owner = self._owner(key)
        if create:
            entry: dict[str, Any] = owner.setdefault(self._param, {})
            return entry
        return owner.get(self._param, {})  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> Any:
        return self._store(key, create=False)[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._view is not None and key in self._view.own_keys:
            self._view.check(self._param, key, value)  # type: ignore[arg-type]
        self._store(key, create=True)[key] = value
        if self._view is not None:
            self._view.changed()

    def __delitem__(self, key: str) -> None:
        store = self._store(key, create=False)
        del store[key]
        if self._view is not None:
            if not store:
                self._owner(key).pop(self._param, None)
            self._view.changed()

    def __iter__(self) -> Iterator[str]:
        if self._view is None:
            yield from self._detached
            return
        yield from self._view.inner.get(self._param, {})
        yield from self._view.own.get(self._param, {})

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class StateView(MutableMapping[Any, Any]):
    """``param -> ParamState``. A parameter without state reads as empty (no entry is
    created, as with torch's ``defaultdict``); ``view[p] = entry`` replaces both parts;
    ``del view[p]`` removes both. Keys that are not tensors (torch allows them, e.g. from a
    state-dict hook) live in the inner optimizer's state."""

    def __init__(self, own: Store, inner: Store, own_keys: frozenset[str],
                 check: Callable[[Tensor, str, Any], None], changed: Callable[[], None]) -> None:  # fmt: skip
        self.own, self.inner, self.own_keys = own, inner, own_keys
        self.check, self.changed = check, changed

    def __getitem__(self, param: Any) -> Any:
        if not isinstance(param, Tensor):
            return self.inner[param]
        return ParamState(view=self, param=param)

    def __setitem__(self, param: Any, entry: Any) -> None:
        if not isinstance(param, Tensor):
            self.inner[param] = entry
            return
        own = {k: v for k, v in entry.items() if k in self.own_keys}
        for key, value in own.items():
            self.check(param, key, value)
        inner = {k: v for k, v in entry.items() if k not in self.own_keys}
        for store, part in ((self.own, own), (self.inner, inner)):
            if part:
                store[param] = part
            else:
                store.pop(param, None)
        self.changed()

    def __delitem__(self, param: Any) -> None:
        if param not in self:
            raise KeyError(param)
        self.own.pop(param, None)
        self.inner.pop(param, None)
        self.changed()

    def __contains__(self, param: object) -> bool:
        return bool(self.own.get(param)) or param in self.inner

    def __iter__(self) -> Iterator[Any]:
        yield from self.inner
        yield from (p for p, entry in self.own.items() if entry and p not in self.inner)

    def __len__(self) -> int:
        return sum(1 for _ in self)
