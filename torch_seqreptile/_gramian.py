"""The float64 Gramian of a few same-sized tensors, accumulated in bounded chunks.

One implementation for every Gramian the library forms: the task-gradient Gramians of the
surgery methods (:mod:`torch_seqreptile.surgery`) and of :class:`TaskGradientProbe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: elements of each tensor converted to float64 at a time, by default
DEFAULT_CHUNK = 1 << 16


def _flat(tensor: Tensor) -> Tensor:
    """The real coordinates of ``tensor``, flat (a complex number is two of them)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.reshape(-1)


def add_gramian_(
    gram: Tensor,
    tensors: Sequence[Tensor],
    chunk: int = DEFAULT_CHUNK,
    products: torch.dtype = torch.float64,
) -> Tensor:
    r"""``gram += G`` with :math:`G_{ij} = \langle x_i, x_j\rangle` over the real coordinates.

    ``tensors`` are T tensors of the same number of elements on ``gram``'s device; ``gram``
    is a float64 ``(T, T)`` tensor. The products are formed in ``products`` precision
    (float64 by default; float32 halves the time of the surgery methods' Gramians, whose
    per-chunk sums then carry float32 rounding), ``chunk`` elements of each tensor at a time,
    and every chunk's products are added to ``gram`` in float64: the extra memory is one
    ``(T, chunk)`` buffer whatever the tensors' size and dtype (bf16, fp16, float32,
    float64, complex).
    """
    flats = [_flat(t) for t in tensors]
    size = flats[0].numel()
    if any(f.numel() != size for f in flats):
        raise ValueError("tensors must all have the same number of elements")
    width = max(1, min(chunk, size))
    rows = torch.empty(len(flats), width, dtype=products, device=gram.device)
    for start in range(0, size, width):
        stop = min(start + width, size)
        block = rows[:, : stop - start]
        for row, flat in zip(block, flats):
            row.copy_(flat[start:stop])
        gram.add_(block @ block.T)
    return gram


def gramian(tensors: Sequence[Tensor], chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The float64 ``(T, T)`` Gramian of ``tensors`` (see :func:`add_gramian_`)."""
    if not tensors:
        raise ValueError("tensors must hold at least one tensor")
    gram = torch.zeros(len(tensors), len(tensors), dtype=torch.float64, device=tensors[0].device)
    return add_gramian_(gram, tensors, chunk)
