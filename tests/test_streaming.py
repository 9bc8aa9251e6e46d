"""``task_stream``: one task per batch from per-task streams, p_t ∝ N_t^q, resumable, ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from torch_seqreptile import task_probabilities

pytest.importorskip("torchdata.nodes")

from torch_seqreptile.streaming import task_stream

SIZES = [30, 120, 480]


class Stream:
    """A re-iterable stream of ``(task, example)`` pairs, like a streaming dataset."""

    def __init__(self, task: int, size: int) -> None:
        self.task, self.size = task, size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.task, i) for i in range(self.size))


def streams() -> list[Stream]:
    return [Stream(t, n) for t, n in enumerate(SIZES)]


def take(loader: Any, count: int) -> list[tuple[int, list[tuple[int, int]]]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("q", [0.0, 0.5])
def test_one_task_per_batch_with_frequencies_n_to_the_q(q: float) -> None:
    """Pearson chi-square of 6000 draws; 13.82 is the 0.999 quantile for df = 2."""
    batches = take(task_stream(streams(), SIZES, 4, q=q, seed=11), 6000)
    for task, batch in batches:
        assert len(batch) == 4 and {t for t, _ in batch} == {task}
    counts = torch.bincount(torch.tensor([task for task, _ in batches]), minlength=3)
    expected = task_probabilities(SIZES, q) * counts.sum()
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82
    wrong = task_probabilities(SIZES, q + 0.3) * counts.sum()  # the test can fail
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 13.82


def test_each_task_stream_is_read_in_order_and_restarts() -> None:
    batches = take(task_stream(streams(), SIZES, 5, q=1.0, seed=0), 400)
    first = [i for task, batch in batches if task == 0 for _, i in batch]
    assert first[:30] == list(range(30)) and first[30:60] == list(range(30))


def test_state_dict_resumes_exactly() -> None:
    full = take(task_stream(streams(), SIZES, 4, seed=3), 60)
    loader = task_stream(streams(), SIZES, 4, seed=3)
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(23)]
    state = loader.state_dict()
    resumed = task_stream(streams(), SIZES, 4, seed=3)  # as a fresh process would build it
    resumed.load_state_dict(state)
    assert seen + take(resumed, 37) == full


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_draw_the_same_tasks_and_disjoint_examples(world_size: int) -> None:
    runs = [
        take(task_stream(streams(), SIZES, 2, seed=5, rank=r, world_size=world_size), 50)
        for r in range(world_size)
    ]
    for step in range(50):
        tasks = {run[step][0] for run in runs}
        assert len(tasks) == 1
        examples = [e for run in runs for e in run[step][1]]
        assert len(examples) == len(set(examples)) == 2 * world_size


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="one entry per task"):
        task_stream(streams(), SIZES[:2], 4)
    with pytest.raises(ValueError, match="batch_size"):
        task_stream(streams(), SIZES, 0)
    with pytest.raises(ValueError, match="rank"):
        task_stream(streams(), SIZES, 4, rank=2, world_size=2)


@pytest.mark.parametrize(
    "short, ranks",
    [([1], 1), ([], 1), (list(range(3)), 3)],  # 1 < batch, empty, one example a rank
)
def test_a_task_that_cannot_fill_a_batch_raises_instead_of_ending(
    short: list[int], ranks: int
) -> None:
    """torchdata's sampler would end every stream, silently, on one rank only."""
    for rank in range(ranks):
        loader = task_stream([short, list(range(100, 130))], [5, 30], 2, q=0.0, seed=1,
                             rank=rank, world_size=ranks)  # fmt: skip
        with pytest.raises(ValueError, match=r"streams\[0\].*no full batch"):
            take(loader, 40)


def test_unequal_shards_stay_in_step() -> None:
    """25 examples on 3 ranks: each rank gets ceil(25 / 3) = 9 a pass (one padded), so the
    ranks' passes, batch sizes and tasks stay aligned."""
    sizes = [25, 40]
    runs = [
        take(task_stream([list(range(25)), list(range(100, 140))], sizes, 3, seed=2, rank=r,
                         world_size=3), 60)
        for r in range(3)
    ]  # fmt: skip
    for step in range(60):
        assert len({run[step][0] for run in runs}) == 1
        assert len({len(run[step][1]) for run in runs}) == 1
    seen = {e for run in runs for task, batch in run if task == 0 for e in batch}
    assert seen == set(range(25))  # no example is lost to the sharding


def test_state_of_other_arguments_is_refused() -> None:
    loader = task_stream(streams(), SIZES, 4, seed=3)
    take(loader, 3)
    other = task_stream(streams(), SIZES, 3, seed=3)
    with pytest.raises(ValueError, match="other arguments"):
        other.load_state_dict(loader.state_dict())
