"""Task sampling: p_t proportional to N_t^q (Lee et al., 2022, Sec. 3.1, Eq. 5).

Both samplers are ``torch.utils.data.Sampler`` s of index lists into a ``ConcatDataset`` of
the task datasets, for ``DataLoader(..., batch_sampler=...)``. Every ``__iter__`` is one
full pass (epoch) of ``len(sampler)`` batches, seeded by ``(seed, epoch)`` (``set_epoch``,
or the next epoch after a complete pass); within a pass a task's examples are drawn without
replacement. ``state_dict`` is ``(epoch, batches taken)`` and resumes exactly, also under
torchdata's ``StatefulDataLoader`` with worker processes. With ``world_size > 1`` every rank
draws the same tasks and an equal, non-empty, disjoint share of the examples.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from torch_seqreptile._validation import check_int


def _check_sizes(task_sizes: Sequence[int]) -> list[int]:
    if isinstance(task_sizes, (str, bytes)) or not isinstance(task_sizes, Sequence):
        raise TypeError(f"task_sizes must be a sequence of ints, got {type(task_sizes).__name__}")
    sizes = [check_int(f"task_sizes[{i}]", n, 0) for i, n in enumerate(task_sizes)]
    if not sizes or sum(sizes) == 0:
        raise ValueError(f"task_sizes must hold at least one positive size, got {sizes}")
    return sizes


def task_probabilities(task_sizes: Sequence[int], q: float) -> Tensor:
    """p_t = N_t^q / sum_s N_s^q in float64 (q=1: proportional, q=0: uniform); empty tasks get 0.

    Computed as a softmax of q·log N_t, so that no q overflows (q = 400 puts all the mass on
    the largest tasks, as the limit does).

    >>> from torch_seqreptile import task_probabilities
    >>> [round(p, 3) for p in task_probabilities([100, 10, 1], q=0.5).tolist()]
    [0.706, 0.223, 0.071]
    """
    sizes = _check_sizes(task_sizes)
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"q must be a finite float, got {type(q).__name__}")
    if not math.isfinite(q):
        raise ValueError(f"q must be a finite float, got {q!r}")
    logits = torch.tensor(
        [q * math.log(n) if n > 0 else -math.inf for n in sizes], dtype=torch.float64
    )
    return torch.softmax(logits, dim=0)


def _generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from the words (e.g. seed, purpose, epoch) by NumPy's
    ``SeedSequence``, so that nearby words give unrelated streams."""
    high, low = np.random.SeedSequence(list(words)).generate_state(2).tolist()
    return torch.Generator().manual_seed((high << 32) | low)


#: purposes of the derived generators (first word after the seed)
_TASK_DRAWS, _SHUFFLES = 0, 1


class _TaskSampler(Sampler[list[int]]):
    """Epoch-seeded passes, rank sharding and resumable state shared by both samplers.

    Pass ``e`` (``set_epoch(e)``, or the next epoch after a complete pass) is a function of
    ``(seed, e)`` alone; the tasks of global step ``g = e * len(self) + i`` are a function of
    ``(seed, g)``, so schedules that span passes (Reptile's cyclic blocks) run on. A pass is
    complete once its ``len(self)`` batches were taken, even if the consumer never asks for
    one more. The state is ``(epoch, batches_in_epoch)``; a resumed pass regenerates the
    skipped batches' indices (no data is loaded).
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        q: float,
        seed: int,
        num_batches: int | None,
        rank: int,
        world_size: int,
        uneven: str,
    ) -> None:
        self.task_sizes = _check_sizes(task_sizes)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if uneven not in ("pad", "drop"):
            raise ValueError(f"uneven must be 'pad' or 'drop', got {uneven!r}")
        self.uneven = uneven
        usable = list(self.task_sizes)
        if uneven == "drop":  # a task too small to give every rank an example is not drawn
            usable = [n if n >= self.world_size else 0 for n in usable]
            if sum(usable) == 0:
                raise ValueError(
                    f"uneven='drop' leaves no task with at least world_size={world_size} "
                    f"examples: task_sizes {self.task_sizes}"
                )
        self.probabilities = task_probabilities(usable, q)
        self.q = float(q)
        self.seed = check_int("seed", seed, 0)
        self.offsets = [0, *itertools.accumulate(self.task_sizes)]
        if num_batches is None:
            num_batches = max(1, sum(self.task_sizes) // (self.batch_size * self.world_size))
        self.num_batches = check_int("num_batches", num_batches, 1)
        self.epoch = 0
        self.batches_in_epoch = 0  # batches of pass ``epoch`` already taken

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` pass ``epoch``, as ``DistributedSampler.set_epoch`` does:
        from its start, unless it is the pass in progress (then from where it is, so that a
        resumed run keeps its position)."""
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch or self.batches_in_epoch >= self.num_batches:
            self.epoch, self.batches_in_epoch = epoch, 0

    def task_of(self, index: int) -> int:
        """The task of a ``ConcatDataset`` index."""
        return task_of(self.offsets, index)

    def __iter__(self) -> Iterator[list[int]]:
        """Pass ``epoch``: its ``len(self)`` batches, or those left of it after a resume."""
        if self.batches_in_epoch >= self.num_batches:  # the last pass was taken in full
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        epoch, skip = self.epoch, self.batches_in_epoch
        shuffles = _Shuffles(self, epoch)
        first = epoch * self.num_batches
        for i in range(self.num_batches):
            batch = [
                index for task in self._tasks_of_step(first + i) for index in shuffles.take(task)
            ]
            if i < skip:
                continue
            if (self.epoch, self.batches_in_epoch) != (epoch, i):
                return  # set_epoch or load_state_dict during the pass: it ends here
            self.batches_in_epoch = i + 1
            yield batch

    def _tasks_of_step(self, step: int) -> list[int]:
        raise NotImplementedError

    def _draw_tasks(self, count: int, generator: torch.Generator) -> list[int]:
        drawn = torch.multinomial(self.probabilities, count, replacement=False, generator=generator)
        return drawn.tolist()

    def _settings(self) -> dict[str, Any]:
        """What the state means: a state of other settings is refused."""
        return {
            "task_sizes": list(self.task_sizes),
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "q": self.q,
            "seed": self.seed,
            "world_size": self.world_size,
            "uneven": self.uneven,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": type(self).__name__,
            "settings": self._settings(),
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; everything is checked first, so a refused state
        (``TypeError``/``ValueError``) leaves the sampler unchanged."""
        if not isinstance(state_dict, dict) or state_dict.get("sampler") != type(self).__name__:
            kind = state_dict.get("sampler") if isinstance(state_dict, dict) else state_dict
            raise ValueError(
                f"state_dict was saved by {kind!r}, expected one of {type(self).__name__}"
            )
        missing = {"settings", "epoch", "batches_in_epoch"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        settings = state_dict["settings"]
        same = isinstance(settings, dict) and settings.keys() == self._settings().keys()
        same = same and all(
            type(settings[k]) is type(v) and settings[k] == v for k, v in self._settings().items()
        )
        if not same:
            mine = self._settings()
            differ = sorted(
                k for k in mine if not isinstance(settings, dict) or settings.get(k) != mine[k]
            )
            raise ValueError(
                f"state_dict is for other sampler settings ({', '.join(differ)}): saved "
                f"{settings}, this sampler has {mine}"
            )
        epoch = check_int("state_dict['epoch']", state_dict["epoch"], 0)
        done = check_int("state_dict['batches_in_epoch']", state_dict["batches_in_epoch"], 0)
        if done > self.num_batches:
            raise ValueError(
                f"state_dict['batches_in_epoch'] must be at most num_batches={self.num_batches}"
                f", got {done}"
            )
        self.epoch, self.batches_in_epoch = epoch, done


class _Shuffles:
    """The per-task example orders of one pass: shuffles without replacement, each drawn
    from the pass's own generator when the previous one runs out (its tail too short for a
    batch is dropped), and this rank's share of each global batch."""

    def __init__(self, sampler: _TaskSampler, epoch: int) -> None:
        self.sampler = sampler
        self.generator = _generator(sampler.seed, _SHUFFLES, epoch)
        count = len(sampler.task_sizes)
        self.orders: list[Tensor] = [torch.empty(0, dtype=torch.long)] * count
        self.positions = [0] * count

    def take(self, task: int) -> list[int]:
        """This rank's share of the next global batch of ``task``: ``batch_size`` examples
        per rank, or the whole task split evenly when it is smaller (``uneven="pad"``
        repeats examples so that every rank gets the same non-zero count, ``"drop"`` leaves
        the remainder out)."""
        s = self.sampler
        size, ranks = s.task_sizes[task], s.world_size
        wanted = min(s.batch_size * ranks, size)
        per_rank = -(-wanted // ranks) if s.uneven == "pad" else wanted // ranks
        if self.positions[task] + wanted > len(self.orders[task]):
            self.orders[task] = torch.randperm(size, generator=self.generator)
            self.positions[task] = 0
        start = self.positions[task]
        self.positions[task] += wanted
        chosen = self.orders[task][start : start + wanted]
        if per_rank * ranks > wanted:  # pad: wrap around this batch's own examples
            chosen = chosen.repeat(-(-per_rank * ranks // wanted))[: per_rank * ranks]
        share = chosen[: per_rank * ranks][s.rank :: ranks]
        return (share + s.offsets[task]).tolist()


def task_of(offsets: Sequence[int], index: int) -> int:
    """The task of ``index`` into a concatenation whose task ``t`` starts at ``offsets[t]``
    (``offsets[-1]`` is the total size).

    >>> from torch_seqreptile import task_of
    >>> [task_of([0, 4, 6], i) for i in (0, 3, 4, 5)]
    [0, 0, 1, 1]
    """
    if not 0 <= index < offsets[-1]:
        raise ValueError(f"index must be in [0, {offsets[-1]}), got {index}")
    return bisect.bisect_right(offsets, index) - 1


class TaskBatchSampler(_TaskSampler):
    """Batches of one task each; the task t is drawn with p_t proportional to N_t^q.

    Args:
        task_sizes: N_t, the number of examples of each task, in ``ConcatDataset`` order.
        batch_size: examples per batch (per rank).
        q: exponent of p_t ∝ N_t^q (paper: 1/5); 1 is proportional, 0 uniform.
        seed: seed of the task draws and the shuffles; all ranks must use the same one.
        num_batches: batches per pass (epoch); default sum(N) // (batch_size·world_size).
        task_order: ``"random"`` (Sequential Reptile: i.i.d. tasks) or ``"cyclic"`` (tasks
            0, 1, ..., T-1 in turn, skipping empty ones: the order :class:`Reptile` needs).
        steps_per_task: consecutive batches from each drawn task (``inner_steps`` for Reptile).
            Blocks count global steps, so they run on across passes.
        rank, world_size: this process's share of each batch under ``torch.distributed``:
            every rank draws the same task and a disjoint share of its examples.
        uneven: a task with fewer than ``batch_size·world_size`` examples: ``"pad"``
            (default) gives every rank the same number, ceil(N_t / world_size), repeating
            examples of the batch where needed (as ``DistributedSampler`` pads);
            ``"drop"`` gives every rank floor(N_t / world_size) and never draws a task with
            fewer than ``world_size`` examples. Either way all ranks get equal, non-empty
            batches.

    Example (indices 0-5 are task 0, 6-7 task 1, as in ``ConcatDataset``):

    >>> from torch_seqreptile import TaskBatchSampler, task_of
    >>> sampler = TaskBatchSampler([6, 2], batch_size=2, seed=0)
    >>> len(sampler)
    4
    >>> [{task_of([0, 6, 8], i) for i in batch} for batch in sampler]  # one task per batch
    [{1}, {1}, {1}, {0}]
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        q: float = 0.2,
        seed: int = 0,
        *,
        num_batches: int | None = None,
        task_order: str = "random",
        steps_per_task: int = 1,
        rank: int = 0,
        world_size: int = 1,
        uneven: str = "pad",
    ) -> None:
        if task_order not in ("random", "cyclic"):
            raise ValueError(f"task_order must be 'random' or 'cyclic', got {task_order!r}")
        self.task_order = task_order
        self.steps_per_task = check_int("steps_per_task", steps_per_task, 1)
        super().__init__(task_sizes, batch_size, q, seed, num_batches, rank, world_size, uneven)
        self._cycle = [t for t, p in enumerate(self.probabilities.tolist()) if p > 0]

    def _tasks_of_step(self, step: int) -> list[int]:
        block = step // self.steps_per_task
        if self.task_order == "cyclic":
            return [self._cycle[block % len(self._cycle)]]
        return self._draw_tasks(1, _generator(self.seed, _TASK_DRAWS, block))

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "task_order": self.task_order,
            "steps_per_task": self.steps_per_task,
        }


class MultiTaskBatchSampler(_TaskSampler):
    """Each batch holds one mini-batch from each of ``tasks_per_step`` distinct tasks.

    The tasks are drawn without replacement with p_t ∝ N_t^q (the paper's MTL baselines use
    8 per step). A batch is the concatenation of the tasks' mini-batches in increasing task
    order; :meth:`task_of` maps its indices back to tasks. Other arguments are those of
    :class:`TaskBatchSampler`.

    >>> from torch_seqreptile import MultiTaskBatchSampler, task_of
    >>> sampler = MultiTaskBatchSampler([4, 2, 2], batch_size=1, tasks_per_step=2, seed=0)
    >>> [[task_of([0, 4, 6, 8], i) for i in batch] for batch in list(sampler)[:3]]
    [[1, 2], [0, 1], [0, 1]]
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        tasks_per_step: int = 8,
        q: float = 0.2,
        seed: int = 0,
        *,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        uneven: str = "pad",
    ) -> None:
        super().__init__(task_sizes, batch_size, q, seed, num_batches, rank, world_size, uneven)
        drawable = int((self.probabilities > 0).sum())
        self.tasks_per_step = min(check_int("tasks_per_step", tasks_per_step, 1), drawable)

    def _tasks_of_step(self, step: int) -> list[int]:
        generator = _generator(self.seed, _TASK_DRAWS, step)
        return sorted(self._draw_tasks(self.tasks_per_step, generator))

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "tasks_per_step": self.tasks_per_step}
