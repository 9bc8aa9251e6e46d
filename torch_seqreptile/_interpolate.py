"""Kernels of the outer (meta) update shared by :class:`SeqReptile` and :class:`Reptile`.

Every path computes, for each parameter tensor (Algorithm 1, lines 9-10; Eq. 3 and 6)::

    g     = slow - target                       # meta-gradient MG(phi)
    buf   = momentum * buf + g                  # only when momentum > 0 (beyond the paper)
    d     = g + momentum * buf if nesterov else buf
    slow  = slow - outer_lr * d                 # == lerp(slow, target, outer_lr) when momentum == 0
    fast  = slow                                # theta <- phi

``target`` is the end of the inner trajectory (``fast`` itself for SeqReptile, the mean of
the task trajectories for Reptile).  Scalars stay Python floats, so no path synchronises
host and device.

Paths (``impl``):

* ``"foreach"``: ``torch._foreach_*`` over tensors grouped by device and dtype (default).
* ``"compiled"``: the foreach function through ``torch.compile``, which fuses the update and
  both writes into one pass over memory.
* ``"per_tensor"``: a plain loop; also the path used when ``slow`` and ``fast`` live on
  different devices (``slow_device``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

OUTER_IMPLS: tuple[str, ...] = ("foreach", "compiled", "per_tensor")


def _update_foreach(
    slow: list[Tensor],
    target: list[Tensor],
    fast: list[Tensor],
    buffers: list[Tensor],
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    if momentum == 0.0:
        torch._foreach_lerp_(slow, target, outer_lr)
    else:
        meta_grad = torch._foreach_sub(slow, target)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, meta_grad)
        if nesterov:
            torch._foreach_add_(meta_grad, buffers, alpha=momentum)
        torch._foreach_add_(slow, meta_grad if nesterov else buffers, alpha=-outer_lr)
    torch._foreach_copy_(fast, slow)


def _update_per_tensor(
    slow: list[Tensor],
    target: list[Tensor],
    fast: list[Tensor],
    buffers: list[Tensor],
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    for i, (s, t, f) in enumerate(zip(slow, target, fast)):
        t = t.to(s.device, non_blocking=True)
        if momentum == 0.0:
            s.lerp_(t, outer_lr)
        else:
            meta_grad = s - t
            buf = buffers[i]
            buf.mul_(momentum).add_(meta_grad)
            direction = meta_grad.add_(buf, alpha=momentum) if nesterov else buf
            s.add_(direction, alpha=-outer_lr)
        f.copy_(s, non_blocking=True)


@functools.cache
def _compiled_update() -> Callable[..., None]:
    return torch.compile(_update_foreach, fullgraph=True, dynamic=False)


_KERNELS: dict[str, Callable[..., None]] = {
    "foreach": _update_foreach,
    "per_tensor": _update_per_tensor,
}


@torch.no_grad()
def outer_update_(
    slow: list[Tensor],
    target: list[Tensor],
    fast: list[Tensor],
    buffers: list[Tensor],
    *,
    outer_lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    impl: str = "foreach",
) -> None:
    """Apply the outer update in place to ``slow`` and copy the result into ``fast``.

    ``buffers`` holds one momentum buffer per tensor when ``momentum > 0`` (else empty).
    ``target`` may alias ``fast``.
    """
    if not slow:
        return
    if any(s.device != f.device for s, f in zip(slow, fast)):
        _update_per_tensor(slow, target, fast, buffers, outer_lr, momentum, nesterov)
        return
    kernel = _compiled_update() if impl == "compiled" else _KERNELS[impl]
    if impl == "per_tensor":
        kernel(slow, target, fast, buffers, outer_lr, momentum, nesterov)
        return
    tensor_lists = [slow, target, fast] + ([buffers] if buffers else [])
    grouped = torch.utils._foreach_utils._group_tensors_by_device_and_dtype(tensor_lists)  # type: ignore[arg-type]
    for group_lists, _ in grouped.values():
        s, t, f = group_lists[0], group_lists[1], group_lists[2]
        b = group_lists[3] if buffers else []
        kernel(s, t, f, b, outer_lr, momentum, nesterov)
