"""Helpers both trainers and the probe callback use; none needs ``transformers``.

* :func:`find_slow_optimizer`, :func:`find_surgery_optimizer`: the method's optimizer inside
  the chain of wrappers the Trainer builds (``accelerate``'s ``AcceleratedOptimizer``);
* :class:`EpochTaskBatchSampler`: a task sampler the Trainer can put at any epoch, so that a
  resumed run draws the batches the interrupted one would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.optim import Optimizer
from torch.utils.data import Sampler

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile._validation import check_int
from torch_seqreptile.sampling import MultiTaskBatchSampler, TaskBatchSampler
from torch_seqreptile.surgery import GradientCombiner

__all__ = ["EpochTaskBatchSampler", "find_slow_optimizer", "find_surgery_optimizer"]


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
    """The :class:`SeqReptile`/:class:`Reptile` inside ``optimizer`` (e.g. an
    ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    found: SlowWeightsOptimizer | None = find_wrapped(optimizer, SlowWeightsOptimizer)
    return found


def find_surgery_optimizer(optimizer: Any) -> GradientCombiner | None:
    """The :mod:`~torch_seqreptile.surgery` optimizer (``PCGrad``, ``MTL``, ...) inside
    ``optimizer`` (e.g. an ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    found: GradientCombiner | None = find_wrapped(optimizer, GradientCombiner)
    return found


class EpochTaskBatchSampler(Sampler[list[int]]):
    """A :class:`TaskBatchSampler` (or :class:`MultiTaskBatchSampler`) that can be put at the
    start of any epoch.

    The Trainer calls ``set_epoch(e)`` before each epoch. In an uninterrupted run the sampler
    just continues its seeded stream; in a run resumed at epoch ``e`` the fresh sampler first
    replays (draws and discards) the index lists of epochs ``0..e-1`` — cheap, no data is
    loaded — so that its stream is where the interrupted run's was. Within the resumed epoch
    the Trainer skips the batches already trained on, which advances the stream the rest of
    the way.
    """

    def __init__(self, sampler: TaskBatchSampler | MultiTaskBatchSampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.epochs_started = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        while self.epochs_started < self.epoch:  # resumed run: catch up with the stream
            for _ in self.sampler:
                pass
            self.epochs_started += 1
        self.epochs_started += 1
        self.epoch = max(self.epoch, self.epochs_started)
        yield from self.sampler

    def task_of(self, index: int) -> int:
        """The task of a dataset index."""
        return self.sampler.task_of(index)
