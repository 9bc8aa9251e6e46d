"""``torch.distributed`` helpers for the meta-optimizers (DDP, FSDP2 and parallel Reptile).

Nothing here is a communication layer of its own: every collective is a
``torch.distributed`` call on a ``ProcessGroup`` the user created with
``torch.distributed.init_process_group`` / ``new_group`` (gloo, NCCL, ...).

* Under ``DistributedDataParallel`` and FSDP2 (``torch.distributed.fsdp.fully_shard``) the
  meta-optimizers need no helper: the inner steps communicate as usual and the outer update
  is local (see ``docs/distributed.md``).
* Parallel :class:`~torch_seqreptile.Reptile` (``parallel=True``) sums the trajectories' end
  points over the process group with :func:`all_reduce_sum_` (the parallel form of Eq. 3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Size of the flat buffers :func:`all_reduce_sum_` communicates (as DDP's buckets, it
#: bounds the transient memory of the collective to one bucket per device and dtype).
BUCKET_BYTES = 64 * 1024 * 1024


def local_tensor(tensor: Tensor) -> Tensor:
    """The tensor that holds this rank's data: the local shard of a ``DTensor`` (FSDP2).

    For a plain tensor it is the tensor itself. For a ``DTensor`` it aliases the local
    shard (outside autograd), so in-place changes to it change the ``DTensor``: the outer
    update of sharded parameters runs on the shards, without communication, because phi,
    theta and the outer buffers of a parameter share its sharding.
    """
    to_local = getattr(tensor, "to_local", None)
    if to_local is None:
        return tensor
    with torch.no_grad():
        local: Tensor = to_local()
    return local


def group_rank_and_size(process_group: Any = None) -> tuple[int, int]:
    """This process's rank in ``process_group`` (``None``: the default group) and its size.

    Raises ``RuntimeError`` if ``torch.distributed`` is unavailable or not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "parallel=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) before creating the optimizer"
        )
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group must contain this process (its rank in it is -1)")
    return rank, dist.get_world_size(process_group)


@torch.no_grad()
def all_reduce_sum_(tensors: list[Tensor], process_group: Any = None) -> None:
    """Replace every tensor by its sum over the ranks of ``process_group``, in place.

    Tensors are grouped by device and dtype and flattened into buckets of at most
    :data:`BUCKET_BYTES` (a tensor larger than that is its own bucket), so a model with
    hundreds of parameter tensors costs a few ``all_reduce`` calls, not hundreds. For a
    ``DTensor`` the local shard is reduced: the group must be the one over which the
    shards are *replicated* (e.g. the replicate dimension of an HSDP mesh). Every rank must
    pass tensors of the same shapes in the same order.
    """
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        local = local_tensor(tensor)
        by_key.setdefault((local.device, local.dtype), []).append(local)
    for group in by_key.values():
        bucket: list[Tensor] = []
        size = 0
        for local in group:
            nbytes = local.numel() * local.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                _all_reduce_bucket(bucket, process_group)
                bucket, size = [], 0
            bucket.append(local)
            size += nbytes
        if bucket:
            _all_reduce_bucket(bucket, process_group)


def _all_reduce_bucket(bucket: list[Tensor], process_group: Any) -> None:
    if len(bucket) == 1 and bucket[0].is_contiguous():
        dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=process_group)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    offset = 0
    for tensor in bucket:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
