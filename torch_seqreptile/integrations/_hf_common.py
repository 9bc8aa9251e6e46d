"""Helpers both trainers and the probe callback use; none needs ``transformers``.

* :func:`find_slow_optimizer`, :func:`find_surgery_optimizer`: the method's optimizer inside
  the chain of wrappers the Trainer builds (``accelerate``'s ``AcceleratedOptimizer``).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile.surgery import GradientCombiner

__all__ = ["find_slow_optimizer", "find_surgery_optimizer"]


def find_wrapped(optimizer: Any, kind: type[Optimizer]) -> Any:
    """The first ``kind`` in the chain ``optimizer``, ``optimizer.optimizer``, ... or ``None``."""
    for _ in range(8):
        if isinstance(optimizer, kind):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def find_slow_optimizer(optimizer: Any) -> SlowWeightsOptimizer | None:
    """The :class:`~torch_seqreptile.SeqReptile`/:class:`~torch_seqreptile.Reptile` inside ``optimizer`` (e.g. an
    ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    found: SlowWeightsOptimizer | None = find_wrapped(optimizer, SlowWeightsOptimizer)
    return found


def find_surgery_optimizer(optimizer: Any) -> GradientCombiner | None:
    """The :mod:`~torch_seqreptile.surgery` optimizer (``PCGrad``, ``MTL``, ...) inside
    ``optimizer`` (e.g. an ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    found: GradientCombiner | None = find_wrapped(optimizer, GradientCombiner)
    return found
