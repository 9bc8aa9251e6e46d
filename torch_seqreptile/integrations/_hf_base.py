"""What :class:`SeqReptileTrainer` and :class:`SurgeryTrainer` share: :class:`TaskSamplingTrainer`.

One process, batches from the method's task sampler (the Trainer's ``set_epoch`` and
``skip_first_batches`` put it where an interrupted run was), and the Trainer's optimizer
wrapped once in the method's optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import ConcatDataset, DataLoader

from torch_seqreptile._validation import check_int
from torch_seqreptile.integrations._hf_common import find_wrapped
from torch_seqreptile.integrations._hf_deps import Trainer
from torch_seqreptile.integrations._hf_probes import ProbeCallback
from torch_seqreptile.sampling import MultiTaskBatchSampler, TaskBatchSampler

__all__ = ["TaskSamplingTrainer"]


class TaskSamplingTrainer(Trainer):  # type: ignore[misc]
    """What :class:`SeqReptileTrainer` and :class:`SurgeryTrainer` share: one process, a
    task sampler over the training set (epoch-seeded: on resume the Trainer's ``set_epoch``
    and ``skip_first_batches`` put it where the interrupted run was) and the Trainer's
    optimizer wrapped once in the method's wrapper.

    Subclasses implement :meth:`_make_sampler` and :meth:`_wrap_optimizer`, set
    ``_wrapper_kind`` and may override :meth:`_wrap_dataset` / :meth:`_wrap_collator`.
    """

    #: the wrapper class this trainer puts around the Trainer's optimizer
    _wrapper_kind: type[Optimizer] = Optimizer

    def __init__(
        self,
        *args: Any,
        task_sizes: Sequence[int] | None,
        q: float,
        sampler_seed: int | None,
        num_batches: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError(
                f"{type(self).__name__} supports one process (world_size must be 1, got "
                f"{self.args.world_size}); see docs/transformers.md"
            )
        self.task_sizes = None if task_sizes is None else list(task_sizes)
        self.q = q
        self.sampler_seed = sampler_seed
        self.num_batches = None if num_batches is None else check_int("num_batches", num_batches, 1)
        self.train_batch_sampler: TaskBatchSampler | MultiTaskBatchSampler | None = None
        self._wrapper: Optimizer | None = None
        for callback in self.callback_handler.callbacks:  # probes log through this trainer
            if isinstance(callback, ProbeCallback) and callback.trainer is None:
                callback.trainer = self

    # ------------------------------------------------------------------ subclass hooks
    def _wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        raise NotImplementedError

    def _make_sampler(
        self, sizes: list[int], batch_size: int, seed: int, num_batches: int
    ) -> TaskBatchSampler | MultiTaskBatchSampler:
        raise NotImplementedError

    def _wrap_dataset(self, dataset: Any) -> Any:
        return dataset

    def _wrap_collator(self, collator: Any) -> Any:
        return collator

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer wrapped in the method's optimizer (once)."""
        if model is None:
            optimizer = super().create_optimizer()
        else:
            optimizer = super().create_optimizer(model)
        found = find_wrapped(optimizer, self._wrapper_kind)
        if found is not None and found is self._wrapper:
            return optimizer  # type: ignore[no-any-return]
        if found is not None:
            raise TypeError(
                f"optimizers[0] must be the inner optimizer, got a {type(found).__name__}; "
                f"{type(self).__name__} wraps it itself (pass the method's arguments to the "
                "trainer)"
            )
        self._wrapper = self._wrap_optimizer(optimizer)
        self.optimizer = self._wrapper
        return self._wrapper

    # ------------------------------------------------------------------ data
    def _task_sizes(self) -> list[int]:
        if self.task_sizes is not None:
            return self.task_sizes
        if isinstance(self.train_dataset, ConcatDataset):
            return [len(d) for d in self.train_dataset.datasets]  # type: ignore[arg-type]
        raise ValueError(
            "task_sizes is required unless train_dataset is a torch.utils.data.ConcatDataset "
            "of the task datasets"
        )

    def get_train_dataloader(self) -> DataLoader[Any]:
        """A DataLoader whose batches come from the method's task sampler."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset: Any = self.train_dataset
        sizes = self._task_sizes()
        if sum(sizes) != len(dataset):
            raise ValueError(
                f"task_sizes must sum to len(train_dataset)={len(dataset)}, got {sizes}"
            )
        accumulation = self.args.gradient_accumulation_steps
        num_batches = self.num_batches
        if num_batches is None:
            num_batches = max(1, sum(sizes) // self._train_batch_size // accumulation)
            num_batches *= accumulation
        seed = self.sampler_seed
        if seed is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = self._make_sampler(sizes, self._train_batch_size, seed, num_batches)
        self.train_batch_sampler = sampler
        collator = self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(
            self._wrap_dataset(dataset),
            batch_sampler=self.train_batch_sampler,
            collate_fn=self._wrap_collator(collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(loader)  # type: ignore[no-any-return]
