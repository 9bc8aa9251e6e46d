"""Task sampling: p_t ∝ N_t^q, one task per batch, epochs without replacement, resume, ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from torch_seqreptile import MultiTaskBatchSampler, TaskBatchSampler, task_probabilities

SIZES = [100, 400, 1600, 50]


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 1.0])
def test_task_probabilities_are_normalised_powers(q: float) -> None:
    p = task_probabilities(SIZES, q)
    expected = torch.tensor([n**q for n in SIZES], dtype=torch.float64)
    torch.testing.assert_close(p, expected / expected.sum())


def test_empty_tasks_have_probability_zero_even_for_q_zero() -> None:
    assert task_probabilities([0, 5, 5], 0.0).tolist() == [0.0, 0.5, 0.5]


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0])
def test_task_frequencies_match_n_to_the_q(q: float) -> None:
    """Pearson chi-square of 20,000 draws against p_t; 16.27 is the 0.999 quantile for df=3."""
    sampler = TaskBatchSampler(SIZES, 4, q=q, seed=123, num_batches=20_000)
    counts = torch.bincount(torch.tensor([sampler.task_of(b[0]) for b in sampler]), minlength=4)
    expected = task_probabilities(SIZES, q) * counts.sum()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 16.27, (counts.tolist(), expected.tolist())


def test_wrong_distribution_is_rejected_by_the_same_statistic() -> None:
    sampler = TaskBatchSampler(SIZES, 4, q=0.2, seed=123, num_batches=20_000)
    counts = torch.bincount(torch.tensor([sampler.task_of(b[0]) for b in sampler]), minlength=4)
    expected = task_probabilities(SIZES, 0.5) * counts.sum()
    assert float(((counts - expected) ** 2 / expected).sum()) > 16.27


def test_each_batch_is_one_task_and_each_epoch_is_without_replacement() -> None:
    sampler = TaskBatchSampler([10, 21], 5, q=1.0, seed=0, num_batches=300)
    per_task: dict[int, list[int]] = {0: [], 1: []}
    for indices in sampler:
        tasks = {sampler.task_of(i) for i in indices}
        assert len(tasks) == 1 and len(indices) == 5
        per_task[tasks.pop()].extend(indices)
    for task, size, offset in [(0, 10, 0), (1, 21, 10)]:
        stream = per_task[task]
        full = size - size % 5  # the remainder of an epoch is dropped
        for epoch in range(len(stream) // full):
            chunk = stream[epoch * full : (epoch + 1) * full]
            assert len(set(chunk)) == full
            assert all(offset <= i < offset + size for i in chunk)


def test_task_smaller_than_batch_gives_the_whole_task() -> None:
    sampler = TaskBatchSampler([3, 50], 8, q=0.0, seed=1, num_batches=40)
    small = [b for b in sampler if sampler.task_of(b[0]) == 0]
    assert small and all(sorted(b) == [0, 1, 2] for b in small)


def test_iterations_continue_the_stream_and_resume_exactly() -> None:
    reference = TaskBatchSampler(SIZES, 7, seed=5, num_batches=30)
    stream = list(reference) + list(reference)
    sampler = TaskBatchSampler(SIZES, 7, seed=5, num_batches=30)
    iterator = iter(sampler)
    first = list(itertools.islice(iterator, 17))
    state = sampler.state_dict()
    resumed = TaskBatchSampler(SIZES, 7, seed=5, num_batches=30)
    resumed.load_state_dict(state)
    rest_of_pass = list(resumed)
    assert len(rest_of_pass) == 13
    assert first + rest_of_pass + list(resumed) == stream
    assert list(TaskBatchSampler(SIZES, 7, seed=5, num_batches=30)) == stream[:30]


@pytest.mark.parametrize("kind", ["task", "multi"])
def test_a_consumer_that_stops_at_len_gets_full_epochs(kind: str) -> None:
    """Lightning stops after ``len(loader)`` batches and never asks for one more."""

    def make() -> TaskBatchSampler | MultiTaskBatchSampler:
        if kind == "task":
            return TaskBatchSampler(SIZES, 7, seed=5, num_batches=9)
        return MultiTaskBatchSampler(SIZES, 7, tasks_per_step=2, seed=5, num_batches=9)

    sampler, exhausted = make(), make()
    bounded = [list(itertools.islice(iter(sampler), len(sampler))) for _ in range(3)]
    assert [len(epoch) for epoch in bounded] == [9, 9, 9]
    assert bounded == [list(exhausted) for _ in range(3)]  # the same stream as run to the end
    loader = DataLoader(TensorDataset(torch.arange(sum(SIZES))), batch_sampler=make())
    assert [len([b for _, b in zip(range(len(loader)), loader)]) for _ in range(3)] == [9] * 3


def test_cyclic_order_with_blocks_skips_empty_tasks() -> None:
    sampler = TaskBatchSampler([5, 0, 5], 2, task_order="cyclic", steps_per_task=2, num_batches=8)
    assert [sampler.task_of(b[0]) for b in sampler] == [0, 0, 2, 2, 0, 0, 2, 2]


def test_ranks_draw_the_same_task_and_disjoint_examples() -> None:
    whole = TaskBatchSampler(SIZES, 6, seed=9, num_batches=50, world_size=1)
    ranks = [
        TaskBatchSampler(SIZES, 3, seed=9, num_batches=50, rank=r, world_size=2) for r in (0, 1)
    ]
    for b0, b1, together in zip(*ranks, whole):
        assert {ranks[0].task_of(b0[0])} == {ranks[1].task_of(i) for i in b1}
        assert not set(b0) & set(b1)
        assert sorted(b0 + b1) == sorted(together)


def test_multi_task_batches_hold_distinct_tasks() -> None:
    sampler = MultiTaskBatchSampler(SIZES, 4, tasks_per_step=3, seed=0, num_batches=200)
    for indices in sampler:
        tasks = [sampler.task_of(i) for i in indices]
        assert len(indices) == 12 and len(set(tasks)) == 3
        assert tasks == sorted(tasks)
    assert MultiTaskBatchSampler(SIZES, 4, tasks_per_step=8).tasks_per_step == 4


def test_works_as_a_dataloader_batch_sampler() -> None:
    datasets = [TensorDataset(torch.full((n,), float(t))) for t, n in enumerate([6, 9])]
    sampler = TaskBatchSampler([len(d) for d in datasets], 3, seed=0, num_batches=10)
    loader = DataLoader(ConcatDataset(datasets), batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == 10
    assert all(len(set(b[0].tolist())) == 1 for b in batches)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task_sizes": [], "batch_size": 2}, "task_sizes"),
        ({"task_sizes": [0, 0], "batch_size": 2}, "task_sizes"),
        ({"task_sizes": [3, -1], "batch_size": 2}, r"task_sizes\[1\]"),
        ({"task_sizes": [3, 2.5], "batch_size": 2}, r"task_sizes\[1\]"),
        ({"task_sizes": [3], "batch_size": 0}, "batch_size"),
        ({"task_sizes": [3], "batch_size": 2, "q": float("nan")}, "q"),
        ({"task_sizes": [3], "batch_size": 2, "q": None}, "q must be a finite float"),
        ({"task_sizes": [3], "batch_size": 2, "q": "0.2"}, "q must be a finite float"),
        ({"task_sizes": [3], "batch_size": 2, "rank": 2, "world_size": 2}, "rank"),
        ({"task_sizes": [3], "batch_size": 2, "task_order": "sorted"}, "task_order"),
        ({"task_sizes": [3], "batch_size": 2, "num_batches": 0}, "num_batches"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        TaskBatchSampler(**kwargs)  # type: ignore[arg-type]


def test_state_dict_of_other_sampler_is_rejected() -> None:
    sampler = TaskBatchSampler([3, 4], 2)
    with pytest.raises(ValueError, match="task_sizes"):
        sampler.load_state_dict(TaskBatchSampler([3, 5], 2).state_dict())
    with pytest.raises(ValueError, match="MultiTaskBatchSampler"):
        sampler.load_state_dict(MultiTaskBatchSampler([3, 4], 2).state_dict())


def test_large_q_does_not_overflow() -> None:
    p = task_probabilities([10, 1000, 1000, 0], 400.0)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        task_probabilities([10, 20], 1.0), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("epoch", -1, "epoch"),
        ("epoch", 1.5, "epoch"),
        ("batches_in_epoch", -1, "batches_in_epoch"),
        ("batches_in_epoch", 99, "num_batches"),
        ("batches_in_epoch", 2.0, "batches_in_epoch"),
        ("settings", {"batch_size": 4}, "other sampler settings"),
        ("settings", "same but 2.0", "other sampler settings"),
        ("seed", 7, "seed"),
        ("batch_size", 3, "batch_size"),
        ("num_batches", 5, "num_batches"),
        ("steps_per_task", 1, "steps_per_task"),
        ("epoch", KeyError, "lacks"),
        ("sampler", "MultiTaskBatchSampler", "MultiTaskBatchSampler"),
    ],
)
def test_tampered_state_is_refused_and_changes_nothing(key: str, value: object, match: str) -> None:
    def make(**changes: object) -> TaskBatchSampler:
        kwargs = {"seed": 1, "num_batches": 6, "steps_per_task": 2, **changes}
        return TaskBatchSampler([3, 5], 2, **kwargs)  # type: ignore[arg-type]

    sampler = make()
    list(itertools.islice(iter(sampler), 3))
    before = sampler.state_dict()
    settings_keys = {"seed", "batch_size", "num_batches", "steps_per_task"}
    if key in settings_keys:  # a state saved by a sampler with other settings
        donor = (
            make(**{key: value})
            if key != "batch_size"
            else TaskBatchSampler([3, 5], 3, seed=1, num_batches=6, steps_per_task=2)
        )
        state = donor.state_dict()
    else:
        donor = make()
        list(itertools.islice(iter(donor), 4))
        state = donor.state_dict()
        if value is KeyError:
            del state[key]
        elif value == "same but 2.0":  # equal numbers of another type are not the same
            state["settings"] = {**state["settings"], "batch_size": 2.0}
        else:
            state[key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == before
    assert list(sampler) == list(itertools.islice(iter(make_resumed(before)), 3))


def make_resumed(state: dict[str, object]) -> TaskBatchSampler:
    sampler = TaskBatchSampler([3, 5], 2, seed=1, num_batches=6, steps_per_task=2)
    sampler.load_state_dict(state)
    return sampler


def test_set_epoch_seeds_each_pass() -> None:
    a = TaskBatchSampler(SIZES, 7, seed=5, num_batches=10)
    epochs = [list(a) for _ in range(3)]
    b = TaskBatchSampler(SIZES, 7, seed=5, num_batches=10)
    b.set_epoch(2)
    assert list(b) == epochs[2]  # any epoch, directly, without replaying the others
    b.set_epoch(0)
    assert list(b) == epochs[0] and epochs[0] != epochs[1]
    b.set_epoch(0)  # again, after that pass was taken in full: the same pass again
    assert list(b) == epochs[0]
    assert b.state_dict()["epoch"] == 0
    c = TaskBatchSampler(SIZES, 7, seed=5, num_batches=10)
    list(itertools.islice(iter(c), 4))
    c.set_epoch(0)  # the pass in progress: set_epoch keeps its position
    assert list(c) == epochs[0][4:]


def test_cyclic_blocks_run_on_across_passes() -> None:
    """Reptile's schedule (K batches of each task in turn) must not restart every epoch."""
    sampler = TaskBatchSampler([6, 6, 6], 2, task_order="cyclic", steps_per_task=2, num_batches=5)
    tasks = [sampler.task_of(b[0]) for _ in range(3) for b in sampler]
    assert tasks == [(i // 2) % 3 for i in range(15)]


@pytest.mark.parametrize("uneven", ["pad", "drop"])
@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
def test_ranks_get_equal_non_empty_disjoint_shares(world_size: int, uneven: str) -> None:
    sizes = [1, 3, 7, 10, 64]  # smaller than, not divisible by, and larger than the ranks
    samplers = [
        TaskBatchSampler(sizes, 4, q=0.0, seed=2, num_batches=40, rank=r, world_size=world_size,
                         uneven=uneven)
        for r in range(world_size)
    ]  # fmt: skip
    passes = [list(s) for s in samplers]
    for step in range(40):
        batches = [p[step] for p in passes]
        tasks = {samplers[0].task_of(i) for b in batches for i in b}
        assert len(tasks) == 1  # every rank drew the same task
        task = tasks.pop()
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) > 0
        if uneven == "drop" or sizes[task] >= 4 * world_size:
            flat = [i for b in batches for i in b]
            assert len(flat) == len(set(flat))  # disjoint
        if uneven == "drop":
            assert sizes[task] >= world_size
