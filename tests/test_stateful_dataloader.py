"""Exact mid-epoch resume with worker processes, through torchdata's ``StatefulDataLoader``.

A plain ``DataLoader`` with workers prefetches: the sampler runs ahead of the training loop,
so its own ``state_dict()`` counts batches not yet trained on. ``StatefulDataLoader``
snapshots the sampler's state together with each batch it hands out, so its
``state_dict()`` is the state after exactly the batches the loop consumed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from torch_seqreptile import MultiTaskBatchSampler, TaskBatchSampler

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")

SIZES = [20, 35, 50]
EPOCH = 9
TOTAL = 3 * EPOCH


def loader(kind: str, workers: int) -> Any:
    data = TensorDataset(torch.arange(sum(SIZES)))
    sampler: TaskBatchSampler | MultiTaskBatchSampler
    if kind == "task":
        sampler = TaskBatchSampler(SIZES, 4, seed=3, num_batches=EPOCH)
    else:
        sampler = MultiTaskBatchSampler(SIZES, 2, tasks_per_step=2, seed=3, num_batches=EPOCH)
    return stateful_dataloader.StatefulDataLoader(
        data, batch_sampler=sampler, num_workers=workers, prefetch_factor=2 if workers else None
    )


def run(data: Any, total: int, stop: int | None = None) -> tuple[list[list[int]], Any]:
    """Batches of epochs in turn until ``total``; the loader's state right after ``stop``."""
    seen: list[list[int]] = []
    while len(seen) < total:
        for batch in data:
            seen.append(batch[0].tolist())
            if len(seen) == stop:
                return seen, data.state_dict()
            if len(seen) == total:
                break
    return seen, None


@pytest.mark.parametrize("kind", ["task", "multi"])
@pytest.mark.parametrize("stop", [3, EPOCH, EPOCH + 4])  # mid-epoch, at its end, in the next
def test_resume_with_two_workers_reproduces_the_uninterrupted_batches(kind: str, stop: int) -> None:
    full, _ = run(loader(kind, 2), TOTAL)
    assert len({tuple(b) for b in full}) > EPOCH  # the epochs differ
    seen, state = run(loader(kind, 2), TOTAL, stop)
    resumed = loader(kind, 2)  # a fresh process would build exactly this
    resumed.load_state_dict(state)
    rest, _ = run(resumed, TOTAL - stop)
    assert seen + rest == full
