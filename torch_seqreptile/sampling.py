"""Task sampling: p_t proportional to N_t^q (Lee et al., 2022, Sec. 3.1, Eq. 5).

Both samplers are ``torch.utils.data.Sampler`` s of index lists into a ``ConcatDataset`` of
the task datasets, for ``DataLoader(..., batch_sampler=...)``. Within a task, examples are
drawn without replacement, one shuffled pass (epoch) after another. Each ``__iter__``
yields ``len(sampler)`` batches and continues the same seeded stream; ``state_dict`` /
``load_state_dict`` resume it exactly. With ``world_size > 1`` every rank draws the same
tasks and a disjoint share of the examples.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


class _TaskSampler(Sampler[list[int]]):
    """Seeded per-task shuffling, rank sharding and resumable state shared by both samplers."""

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        q: float,
        seed: int,
        num_batches: int | None,
        rank: int,
        world_size: int,
    ) -> None:
        self.task_sizes = _check_sizes(task_sizes)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.probabilities = task_probabilities(self.task_sizes, q)
        self.q = float(q)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.offsets = [0, *itertools.accumulate(self.task_sizes)]
        if num_batches is None:
            num_batches = max(1, sum(self.task_sizes) // (self.batch_size * self.world_size))
        self.num_batches = check_int("num_batches", num_batches, 1)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.permutations: list[Tensor] = [torch.empty(0, dtype=torch.long)] * len(self.task_sizes)
        self.positions = [0] * len(self.task_sizes)
        self.batches_in_epoch = 0  # batches of the current __iter__ pass already yielded

    def __len__(self) -> int:
        return self.num_batches

    def task_of(self, index: int) -> int:
        """The task of a ``ConcatDataset`` index."""
        if not 0 <= index < self.offsets[-1]:
            raise ValueError(f"index must be in [0, {self.offsets[-1]}), got {index}")
        return bisect.bisect_right(self.offsets, index) - 1

    def _take(self, task: int) -> list[int]:
        """This rank's share of the next global batch of ``task`` (without replacement)."""
        wanted = min(self.batch_size * self.world_size, self.task_sizes[task])
        if self.positions[task] + wanted > len(self.permutations[task]):
            self.permutations[task] = torch.randperm(
                self.task_sizes[task], generator=self.generator
            )
            self.positions[task] = 0
        start = self.positions[task]
        self.positions[task] += wanted
        chosen = self.permutations[task][start : start + wanted][self.rank :: self.world_size]
        return (chosen + self.offsets[task]).tolist()

    def _next_batch(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current pass of ``len(self)`` batches (all of it unless resumed).

        A pass whose ``len(self)`` batches were all taken is complete even if the consumer
        stopped without asking for one more (Lightning, ``zip(range(len(loader)), loader)``).
        """
        if self.batches_in_epoch >= self.num_batches:
            self.batches_in_epoch = 0
        while self.batches_in_epoch < self.num_batches:
            self.batches_in_epoch += 1
            yield self._next_batch()
        self.batches_in_epoch = 0

    def _draw_tasks(self, count: int) -> list[int]:
        drawn = torch.multinomial(
            self.probabilities, count, replacement=False, generator=self.generator
        )
        return drawn.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": type(self).__name__,
            "task_sizes": list(self.task_sizes),
            "generator": self.generator.get_state(),
            "permutations": list(self.permutations),
            "positions": list(self.positions),
            "batches_in_epoch": self.batches_in_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; everything is checked first, so a refused state
        (``TypeError``/``ValueError``) leaves the sampler unchanged."""
        self._prepare_load(state_dict)()

    def _prepare_load(self, state_dict: dict[str, Any]) -> Callable[[], None]:
        """Validate ``state_dict``; return the function that commits it."""
        if not isinstance(state_dict, dict) or state_dict.get("sampler") != type(self).__name__:
            kind = state_dict.get("sampler") if isinstance(state_dict, dict) else state_dict
            raise ValueError(
                f"state_dict was saved by {kind!r}, expected one of {type(self).__name__}"
            )
        missing = {"task_sizes", "generator", "permutations", "positions", "batches_in_epoch"}
        missing -= set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        if list(state_dict["task_sizes"]) != self.task_sizes:
            raise ValueError(
                f"state_dict is for task_sizes {state_dict['task_sizes']}, "
                f"this sampler has {self.task_sizes}"
            )
        generator = state_dict["generator"]
        try:
            torch.Generator().set_state(generator)
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                f"state_dict['generator'] is not a generator state: {error}"
            ) from error
        permutations, positions = state_dict["permutations"], state_dict["positions"]
        count = len(self.task_sizes)
        if not isinstance(permutations, list) or len(permutations) != count:
            raise ValueError(f"state_dict['permutations'] must be a list of {count} tensors")
        if not isinstance(positions, list) or len(positions) != count:
            raise ValueError(f"state_dict['positions'] must be a list of {count} ints")
        for t, (perm, position, size) in enumerate(zip(permutations, positions, self.task_sizes)):
            if not isinstance(perm, Tensor) or perm.dtype != torch.long or perm.dim() != 1:
                raise ValueError(f"state_dict['permutations'][{t}] must be a 1-d long tensor")
            if perm.numel() and not torch.equal(perm.sort().values, torch.arange(size)):
                raise ValueError(
                    f"state_dict['permutations'][{t}] must be a permutation of range({size})"
                )
            check_int(f"state_dict['positions'][{t}]", position, 0)
            if position > perm.numel():
                raise ValueError(
                    f"state_dict['positions'][{t}] must be at most {perm.numel()}, got {position}"
                )
        done = check_int("state_dict['batches_in_epoch']", state_dict["batches_in_epoch"], 0)
        if done > self.num_batches:
            raise ValueError(
                f"state_dict['batches_in_epoch'] must be at most num_batches={self.num_batches}"
                f", got {done} (a state of a sampler with other batch settings?)"
            )

        def commit() -> None:
            self.generator.set_state(generator)
            self.permutations = [p.clone() for p in permutations]
            self.positions = list(positions)
            self.batches_in_epoch = done

        return commit


class TaskBatchSampler(_TaskSampler):
    """Batches of one task each; the task t is drawn with p_t proportional to N_t^q.

    Args:
        task_sizes: N_t, the number of examples of each task, in ``ConcatDataset`` order.
        batch_size: examples per batch (per rank).
        q: exponent of p_t ∝ N_t^q (paper: 1/5); 1 is proportional, 0 uniform.
        seed: seed of the task draws and the shuffles; all ranks must use the same one.
        num_batches: batches per ``__iter__`` pass (default: sum(N) // (batch_size·world_size)).
            A pass resumed from ``state_dict`` yields only the batches it had left.
        task_order: ``"random"`` (Sequential Reptile: i.i.d. tasks) or ``"cyclic"`` (tasks
            0, 1, ..., T-1 in turn, skipping empty ones: the order :class:`Reptile` needs).
        steps_per_task: consecutive batches from each drawn task (``inner_steps`` for Reptile).
        rank, world_size: this process's share of each batch under ``torch.distributed``.
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
    ) -> None:
        super().__init__(task_sizes, batch_size, q, seed, num_batches, rank, world_size)
        if task_order not in ("random", "cyclic"):
            raise ValueError(f"task_order must be 'random' or 'cyclic', got {task_order!r}")
        self.task_order = task_order
        self.steps_per_task = check_int("steps_per_task", steps_per_task, 1)
        self.block_task = -1  # task of the current block of steps_per_task batches
        self.block_left = 0

    def _next_task(self) -> int:
        if self.block_left == 0:
            if self.task_order == "random":
                self.block_task = self._draw_tasks(1)[0]
            else:
                self.block_task = next(
                    t
                    for t in itertools.chain(
                        range(self.block_task + 1, len(self.task_sizes)),
                        range(len(self.task_sizes)),
                    )
                    if self.task_sizes[t] > 0
                )
            self.block_left = self.steps_per_task
        self.block_left -= 1
        return self.block_task

    def _next_batch(self) -> list[int]:
        return self._take(self._next_task())

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "block_task": self.block_task,
            "block_left": self.block_left,
        }

    def _prepare_load(self, state_dict: dict[str, Any]) -> Callable[[], None]:
        commit_streams = super()._prepare_load(state_dict)
        if "block_task" not in state_dict or "block_left" not in state_dict:
            raise ValueError("state_dict lacks ['block_left', 'block_task']")
        task = check_int("state_dict['block_task']", state_dict["block_task"], -1)
        left = check_int("state_dict['block_left']", state_dict["block_left"], 0)
        if task >= len(self.task_sizes) or left > self.steps_per_task or (left and task < 0):
            raise ValueError(
                f"state_dict's block (task {task}, {left} batches left) does not fit "
                f"{len(self.task_sizes)} tasks and steps_per_task={self.steps_per_task}"
            )
        if left and self.task_sizes[task] == 0:
            raise ValueError(f"state_dict['block_task'] is {task}, an empty task")

        def commit() -> None:
            commit_streams()
            self.block_task, self.block_left = task, left

        return commit


class MultiTaskBatchSampler(_TaskSampler):
    """Each batch holds one mini-batch from each of ``tasks_per_step`` distinct tasks.

    The tasks are drawn without replacement with p_t ∝ N_t^q (the paper's MTL baselines use
    8 per step). A batch is the concatenation of the tasks' mini-batches in increasing task
    order; :meth:`task_of` maps its indices back to tasks. Other arguments are those of
    :class:`TaskBatchSampler`.
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
    ) -> None:
        super().__init__(task_sizes, batch_size, q, seed, num_batches, rank, world_size)
        nonempty = sum(1 for n in self.task_sizes if n > 0)
        self.tasks_per_step = min(check_int("tasks_per_step", tasks_per_step, 1), nonempty)

    def _next_batch(self) -> list[int]:
        tasks = sorted(self._draw_tasks(self.tasks_per_step))
        return [index for task in tasks for index in self._take(task)]
