"""One task per batch from per-task *streams* (``IterableDataset`` s, e.g. Hugging Face
``datasets`` in streaming mode), with p_t ∝ N_t^q (Lee et al., 2022, Eq. 5).

torchdata's nodes do the work: each task's stream is read by an ``IterableWrapper`` and cut
into batches by a ``Batcher``; a ``MultiNodeWeightedSampler`` draws, for every step, the
task whose next batch comes out (``CYCLE_FOREVER``: a task whose stream runs out starts its
next pass), and the ``Loader`` around them is resumable (``state_dict``). What this module
adds is what they lack for Sequential Reptile: the weights N_t^q, draws that are the same
on every rank (torchdata seeds its sampler per rank; here it is given rank 0 of 1 on every
rank, with the same seed), and this rank's share of each stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from torch_seqreptile._validation import check_bool, check_int
from torch_seqreptile.sampling import task_probabilities

try:
    from torchdata.nodes import (
        BaseNode,
        Batcher,
        IterableWrapper,
        Loader,
        Mapper,
        MultiNodeWeightedSampler,
    )
    from torchdata.nodes.samplers.stop_criteria import StopCriteria
except ImportError as error:
    raise ImportError(
        'torch_seqreptile.streaming needs torchdata: pip install "torch-seqreptile[stream]"'
    ) from error

T = TypeVar("T")


class _RankShard(Iterable[T]):
    """Item ``rank`` of every group of ``world_size`` consecutive items of ``stream`` (a fresh
    pass each ``iter()``). A last, incomplete group is wrapped around, so that every rank gets
    ceil(N / world_size) items, as ``DistributedSampler`` pads: the ranks stay in step."""

    def __init__(self, stream: Iterable[T], rank: int, world_size: int) -> None:
        self.stream, self.rank, self.world_size = stream, rank, world_size

    def __iter__(self) -> Iterator[T]:
        group: list[T] = []
        for item in self.stream:
            group.append(item)
            if len(group) == self.world_size:
                yield group[self.rank]
                group = []
        if group:
            yield group[self.rank % len(group)]


class _NonEmptyPasses(BaseNode):  # type: ignore[misc]
    """A task's node of batches that raises, instead of ending silently, when a whole pass of
    it gives no batch (torchdata's weighted sampler would then end every task's stream)."""

    def __init__(self, source: Any, task: int) -> None:
        super().__init__()
        self.source, self.task = source, task

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(None if initial_state is None else initial_state["source"])
        self.fresh = True if initial_state is None else bool(initial_state["fresh"])

    def next(self) -> Any:
        try:
            item = next(self.source)
        except StopIteration:
            if self.fresh:
                raise ValueError(
                    f"streams[{self.task}] (this rank's share of it) gave no full batch in a "
                    "whole pass: every task that can be drawn needs at least batch_size "
                    "examples per rank"
                ) from None
            raise
        self.fresh = False
        return item

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "fresh": self.fresh}


class TaskStreamLoader(Loader):  # type: ignore[misc]
    """The ``Loader`` :func:`task_stream` returns: its ``state_dict`` also records the
    arguments, and ``load_state_dict`` refuses a state saved with other ones."""

    def __init__(self, root: Any, settings: dict[str, Any]) -> None:
        super().__init__(root)
        self.settings = settings

    def state_dict(self) -> dict[str, Any]:
        return {"task_stream": self.settings, "loader": super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("task_stream") if isinstance(state_dict, dict) else None
        if saved != self.settings or "loader" not in state_dict:
            raise ValueError(
                f"state_dict was saved by a task_stream with other arguments: {saved}, this "
                f"one has {self.settings}"
            )
        super().load_state_dict(state_dict["loader"])


def _tag(task: int, batch: list[Any]) -> tuple[int, list[Any]]:
    return task, batch


def task_stream(
    streams: Sequence[Iterable[Any]],
    task_sizes: Sequence[int],
    batch_size: int,
    q: float = 0.2,
    seed: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    shard: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> TaskStreamLoader:
    """A resumable iterable of ``(task, batch)``: each batch holds ``batch_size`` examples of
    one task, the task drawn with p_t ∝ N_t^q.

    Args:
        streams: one iterable of examples per task; ``iter()`` must start a new pass.
        task_sizes: N_t, from the datasets' metadata (``dataset.info.splits[...]
            .num_examples`` for Hugging Face datasets) or your own counts; only p_t uses them.
        batch_size: examples per batch (per rank); the tail of a task's pass too short for a
            batch is dropped.
        q: exponent of p_t ∝ N_t^q (paper: 1/5).
        seed: seed of the task draws; every rank must use the same one.
        rank, world_size: this process's place. All ranks draw the same task every step.
        shard: take this rank's share of each stream (example ``rank`` of every
            ``world_size`` consecutive ones; a last incomplete group is wrapped around, so
            every rank gets the same count and the ranks stay in step). Pass ``False`` for
            streams already split per rank (e.g. by
            ``datasets.distributed.split_dataset_by_node``, whose shards must then give every
            rank the same number of batches): their own ``state_dict`` is then used on
            resume, instead of re-reading the consumed part of each stream.
        collate_fn: applied to each batch (a list of examples); default: the list itself.

    Returns:
        a :class:`~torch_seqreptile.streaming.TaskStreamLoader` (a ``torchdata.nodes.Loader``): iterate it for ``(task, batch)``; its ``state_dict()`` /
        ``load_state_dict()`` resume the draws and every stream exactly (a loader built
        with the same arguments, then ``load_state_dict``, continues the same sequence; a
        state saved with other arguments is refused).

    Raises:
        ValueError: at iteration, if a drawn task's stream (this rank's share) has fewer
            than ``batch_size`` examples.
    """

    if len(streams) != len(task_sizes):
        raise ValueError(
            f"streams and task_sizes must have one entry per task, got {len(streams)} and "
            f"{len(task_sizes)}"
        )
    probabilities = task_probabilities(task_sizes, q).tolist()
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    shard = check_bool("shard", shard)
    nodes = {}
    for task, (stream, p) in enumerate(zip(streams, probabilities)):
        if p == 0.0:
            continue  # an empty task is never drawn
        source = _RankShard(stream, rank, world_size) if shard and world_size > 1 else stream
        batches = Batcher(IterableWrapper(source), batch_size, drop_last=True)
        if collate_fn is not None:
            batches = Mapper(batches, collate_fn)
        nodes[str(task)] = _NonEmptyPasses(Mapper(batches, functools.partial(_tag, task)), task)
    sampler = MultiNodeWeightedSampler(
        nodes,
        {str(t): p for t, p in enumerate(probabilities) if p > 0.0},
        stop_criteria=StopCriteria.CYCLE_FOREVER,
        rank=0,  # the same draws on every rank
        world_size=1,
        seed=seed,
    )
    settings = {"task_sizes": list(task_sizes), "batch_size": batch_size, "q": float(q),
                "seed": seed, "world_size": world_size, "shard": shard}  # fmt: skip
    return TaskStreamLoader(sampler, settings)
