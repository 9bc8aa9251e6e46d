"""Kernels of the outer (meta) update shared by :class:`SeqReptile` and :class:`Reptile`.

Every path computes, for each parameter tensor (Algorithm 1, lines 9-10; Eq. 3 and 6)::

    g     = slow - target                       # meta-gradient MG(phi)
    buf   = momentum * buf + g                  # only when momentum > 0 (beyond the paper)
    d     = g + momentum * buf if nesterov else buf
    slow  = slow - outer_lr * d                 # == lerp(slow, target, outer_lr) when momentum == 0
    fast  = slow                                # theta <- phi

``target`` is the end of the inner trajectory (``fast`` itself for SeqReptile, the mean of
the task trajectories for Reptile). Scalars are Python floats (0-d CPU tensors in the
compiled path), so no path synchronises host and device except the blocking copies of the
cross-device path.

Paths (``impl``):

* ``"foreach"``: ``torch._foreach_*`` over tensors grouped by device and dtype (default).
* ``"compiled"``: the foreach function through ``torch.compile``, which fuses the update and
  both writes into one pass over memory.
* ``"per_tensor"``: a plain loop; also the path of every tensor whose ``slow``, ``target``
  and ``fast`` differ in device (``slow_device``) or dtype (float32 slow weights of bf16/fp16
  parameters). There ``target`` is converted to ``slow``'s device and dtype and ``fast`` is
  rounded from ``slow`` (``copy_``), with blocking copies: a device-to-host copy is read on
  the host only once it has landed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from torch.optim import Optimizer

OUTER_IMPLS: tuple[str, ...] = ("foreach", "compiled", "per_tensor")


def _update_foreach(
    slow: list[Tensor],
    target: list[Tensor],
    fast: list[Tensor],
    buffers: list[Tensor],
    outer_lr: float | Tensor,
    momentum: float | Tensor,
    nesterov: bool,
) -> None:
    if not buffers:  # momentum == 0
        torch._foreach_lerp_(slow, target, outer_lr)  # type: ignore[arg-type]  # 0-d weight
    else:
        meta_grad = torch._foreach_sub(slow, target)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, meta_grad)
        if nesterov:
            _add_scaled_(meta_grad, buffers, momentum)
        _add_scaled_(slow, meta_grad if nesterov else buffers, -outer_lr)
    torch._foreach_copy_(fast, slow)


def _add_scaled_(
    tensors: list[Tensor] | tuple[Tensor, ...],
    other: list[Tensor] | tuple[Tensor, ...],
    scale: float | Tensor,
) -> None:
    """``tensors += scale * other``; a 0-d tensor ``scale`` is the compiled path's."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(tensors, torch._foreach_mul(other, scale))
    else:
        torch._foreach_add_(tensors, other, alpha=scale)


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
        t = t.to(device=s.device, dtype=s.dtype)  # blocking: no unsynchronised host read
        if momentum == 0.0:
            s.lerp_(t, outer_lr)
        else:
            meta_grad = s - t
            buf = buffers[i]
            buf.mul_(momentum).add_(meta_grad)
            direction = meta_grad.add_(buf, alpha=momentum) if nesterov else buf
            s.add_(direction, alpha=-outer_lr)
        f.copy_(s)


def _same_kind(*tensors: Tensor) -> bool:
    first = tensors[0]
    return all(t.device == first.device and t.dtype == first.dtype for t in tensors[1:])


@functools.cache
def _compiled_kernel() -> Callable[..., None]:
    # Not fullgraph: past dynamo's recompile limit (many groups of distinct shapes) the
    # update falls back to eager instead of raising.
    return torch.compile(_update_foreach)


def _update_compiled(
    slow: list[Tensor],
    target: list[Tensor],
    fast: list[Tensor],
    buffers: list[Tensor],
    outer_lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    # Python floats would be specialised: one recompilation per new outer_lr. 0-d CPU
    # float64 tensors are graph inputs instead (not rounded to a low-precision phi's
    # dtype), read without a device synchronisation.
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float64)

    _compiled_kernel()(slow, target, fast, buffers, scalar(outer_lr), scalar(momentum), nesterov)


def _select(lists: list[list[Tensor]], indices: list[int]) -> list[list[Tensor]]:
    return [[tensors[i] for i in indices] if tensors else [] for tensors in lists]


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
    if impl == "per_tensor":
        _update_per_tensor(slow, target, fast, buffers, outer_lr, momentum, nesterov)
        return
    uniform = [_same_kind(s, t, f) for s, t, f in zip(slow, target, fast)]
    if not all(uniform):
        lists = [slow, target, fast, buffers]
        s, t, f, b = _select(lists, [i for i, same in enumerate(uniform) if not same])
        _update_per_tensor(s, t, f, b, outer_lr, momentum, nesterov)
        slow, target, fast, buffers = _select(lists, [i for i, same in enumerate(uniform) if same])
        if not slow:
            return
    kernel = _update_compiled if impl == "compiled" else _update_foreach
    tensor_lists = [slow, target, fast] + ([buffers] if buffers else [])
    # Optimizer's own grouping: under torch.compile it leaves the grouping to inductor.
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensor_lists)  # type: ignore[arg-type]
    for group_lists, _ in grouped.values():
        lists = cast(list[list[Tensor]], group_lists)
        b = lists[3] if buffers else []
        kernel(lists[0], lists[1], lists[2], b, outer_lr, momentum, nesterov)


@torch.no_grad()
def copy_weights_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i] <- src[i]`` (rounded to ``dst``'s dtype), with blocking cross-device copies."""
    if dst:
        torch._foreach_copy_(dst, src)
