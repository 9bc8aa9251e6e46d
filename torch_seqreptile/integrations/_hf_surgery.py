r"""The multi-task baselines in the Trainer: :class:`SurgeryTrainer`.

Batches of ``tasks_per_step`` tasks from :class:`~torch_seqreptile.MultiTaskBatchSampler`
that carry the task of every example (:class:`_TaskTagged`, :class:`_TaskTaggingCollator`),
one loss per task (:func:`per_example_cross_entropy` by default) and
``optimizer.backward(losses)`` in ``training_step``; the surgery optimizer's state travels in
every checkpoint's ``optimizer.pt``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.utils.data import Dataset

from torch_seqreptile._validation import check_int
from torch_seqreptile.integrations._hf_base import TaskSamplingTrainer
from torch_seqreptile.integrations._hf_common import find_surgery_optimizer
from torch_seqreptile.sampling import MultiTaskBatchSampler, task_of
from torch_seqreptile.surgery import MTL, GradientCombiner, GradNorm, GradVac

__all__ = ["SurgeryTrainer", "per_example_cross_entropy"]


class _TaskTagged(Dataset[tuple[int, Any]]):
    """``dataset[i]`` together with the task of ``i``: ``(task, example)``."""

    def __init__(self, dataset: Any, offsets: list[int]) -> None:
        self.dataset = dataset
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return task_of(self.offsets, index), self.dataset[index]


class _TaskTaggingCollator:
    """Collates the examples with ``collator`` and adds their tasks as ``batch[key]``."""

    def __init__(self, collator: Callable[[list[Any]], Any], key: str) -> None:
        self.collator = collator
        self.key = key

    def __call__(self, rows: list[tuple[int, Any]]) -> Any:
        batch = self.collator([example for _, example in rows])
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                "SurgeryTrainer needs the data collator to return a dict (mapping) batch, got "
                f"{type(batch).__name__}"
            )
        if self.key in batch:
            raise ValueError(f"the collated batch already has a {self.key!r} field")
        batch[self.key] = torch.tensor([task for task, _ in rows], dtype=torch.long)
        return batch


def per_example_cross_entropy(outputs: Any, labels: Tensor) -> Tensor:
    """Default ``loss_fn`` of :class:`SurgeryTrainer`: one cross-entropy per example.

    ``outputs["logits"]`` (or ``outputs[0]``) of shape ``(B, C)`` with integer ``labels``
    ``(B,)`` (sequence classification), or ``(B, L, C)`` with ``(B, L)`` (token
    classification; positions labelled -100 are ignored and each example gets the mean over its
    labelled positions, 0 if it has none). Labels are used as given (no causal-LM shift).
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("per_example_cross_entropy needs tensor logits and labels")
    if labels.is_floating_point() or logits.dim() != labels.dim() + 1 or logits.dim() not in (2, 3):
        raise ValueError(
            f"per_example_cross_entropy handles logits (B, C) with labels (B,) or logits "
            f"(B, L, C) with labels (B, L), got logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)} ({labels.dtype}); pass loss_fn= to SurgeryTrainer"
        )
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    token = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100
    ).view_as(labels)
    counts = labels.ne(-100).sum(1).clamp(min=1)
    return token.sum(1) / counts


class SurgeryTrainer(TaskSamplingTrainer):
    r"""``transformers.Trainer`` training with a multi-task baseline of
    :mod:`torch_seqreptile.surgery` (``MTL``, ``PCGrad``, ``GradVac``, ``GradNorm``,
    ``CAGrad``, ``MGDA``).

    Each batch holds one mini-batch of each of ``tasks_per_step`` distinct tasks
    (:class:`~torch_seqreptile.MultiTaskBatchSampler`, p_t ∝ N_t^q); the task of every example
    travels with the batch as ``batch["task_ids"]``. ``training_step`` computes one loss per
    task in the batch (:meth:`compute_task_losses`: the mean of ``loss_fn``'s per-example
    losses over the task's rows, tasks in increasing order) and calls
    ``optimizer.backward(losses)`` instead of ``loss.backward()``; the Trainer then clips,
    steps and schedules as usual. The surgery optimizer's ``state_dict`` (inner state, random
    order, GradVac targets, GradNorm weights) goes into every checkpoint's ``optimizer.pt``
    and a resumed run continues exactly.

    Besides the ``Trainer``'s own arguments, all keyword-only:

    Args:
        method: a :class:`~torch_seqreptile.surgery.GradientCombiner` subclass (e.g.
            ``PCGrad``), built as ``method(optimizer, num_tasks=tasks_per_step, **method_kwargs)``
            (plus ``seed=args.seed`` for PCGrad/GradVac and ``layers=model`` for GradVac unless
            given), or a callable ``optimizer -> GradientCombiner`` that wraps the optimizer
            it is given.
        tasks_per_step: tasks in each batch (paper: 8; capped at the number of non-empty
            tasks). GradVac and GradNorm keep per-task state, so they need every task in every
            batch (``tasks_per_step >= T``).
        task_sizes, q, sampler_seed, num_batches: as for :class:`SeqReptileTrainer`;
            ``per_device_train_batch_size`` is the mini-batch size *per task*.
        loss_fn: ``loss_fn(outputs, labels) -> Tensor (B,)``, one loss per example; default
            :func:`per_example_cross_entropy`. ``labels`` (``batch["labels"]``) is taken out
            of the batch before ``model(**batch)``, so the model returns logits only.
        method_kwargs: further keyword arguments of ``method`` (``c`` for CAGrad, ...).
        task_key: the batch field that carries the task ids.

    Override :meth:`compute_task_losses` for anything else (a causal-LM shift, a model that
    needs its labels, per-task heads). Not supported (``ValueError``): several processes,
    ``fp16`` (GradScaler), and gradient accumulation with any method but ``MTL``.
    """

    _wrapper_kind = GradientCombiner

    def __init__(
        self,
        *args: Any,
        method: type[GradientCombiner] | Callable[[Optimizer], GradientCombiner],
        tasks_per_step: int = 8,
        task_sizes: Sequence[int] | None = None,
        q: float = 0.2,
        sampler_seed: int | None = None,
        num_batches: int | None = None,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        method_kwargs: Mapping[str, Any] | None = None,
        task_key: str = "task_ids",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            task_sizes=task_sizes,
            q=q,
            sampler_seed=sampler_seed,
            num_batches=num_batches,
            **kwargs,
        )
        if not callable(method):
            raise TypeError(f"method must be a surgery class or a callable, got {method!r}")
        if isinstance(method, type) and not issubclass(method, GradientCombiner):
            raise TypeError(
                f"method must be a torch_seqreptile.surgery class, got {method.__name__}"
            )
        if method_kwargs and not isinstance(method, type):
            raise ValueError("method_kwargs apply to a surgery class, not to a callable method")
        if self.args.fp16:
            raise ValueError(
                "SurgeryTrainer does not support fp16 (GradScaler): a scaled step with inf "
                "gradients makes the surgery's finiteness check raise; use bf16=True"
            )
        self.method = method
        self.tasks_per_step = check_int("tasks_per_step", tasks_per_step, 1)
        self.loss_fn = loss_fn or per_example_cross_entropy
        self.method_kwargs = dict(method_kwargs or {})
        self.task_key = task_key

    # ------------------------------------------------------------------ optimizer
    @property
    def surgery(self) -> GradientCombiner | None:
        """The surgery optimizer once it exists, else ``None``."""
        return find_surgery_optimizer(self.optimizer)

    def _num_step_tasks(self) -> int:
        """Tasks in every batch: ``tasks_per_step`` capped at the non-empty tasks."""
        return min(self.tasks_per_step, sum(1 for n in self._task_sizes() if n > 0))

    def _wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        per_step = self._num_step_tasks()
        method = self.method
        wrapper: Any
        if isinstance(method, type) and issubclass(method, GradientCombiner):
            kwargs = {"num_tasks": per_step, **self.method_kwargs}
            if method.uses_rng and "seed" not in kwargs:
                kwargs["seed"] = self.args.seed
            if issubclass(method, GradVac) and "layers" not in kwargs:
                kwargs["layers"] = self.model  # one block per module, as in the paper
            wrapper = method(optimizer, **kwargs)
        else:
            wrapper = cast(Callable[[Optimizer], Any], method)(optimizer)
            if not isinstance(wrapper, GradientCombiner):
                raise TypeError(
                    "method(optimizer) must return a torch_seqreptile.surgery optimizer, got "
                    f"{type(wrapper).__name__}"
                )
            if wrapper.param_groups is not optimizer.param_groups:
                raise ValueError("method(optimizer) must wrap the optimizer it is given")
        if wrapper.num_tasks is not None and wrapper.num_tasks != per_step:
            raise ValueError(
                f"the surgery optimizer has num_tasks={wrapper.num_tasks} but every batch holds "
                f"{per_step} tasks (tasks_per_step)"
            )
        total = sum(1 for n in self._task_sizes() if n > 0)
        if isinstance(wrapper, (GradNorm, GradVac)) and per_step < total:
            raise ValueError(
                f"{type(wrapper).__name__} keeps per-task state, so every batch must hold every "
                f"task: set tasks_per_step >= {total} (got {self.tasks_per_step})"
            )
        if self.args.gradient_accumulation_steps > 1 and not isinstance(wrapper, MTL):
            raise ValueError(
                f"gradient_accumulation_steps > 1 is only supported with MTL: "
                f"{type(wrapper).__name__} combines the task gradients of one batch non-linearly"
            )
        combiner: GradientCombiner = wrapper
        return combiner

    # ------------------------------------------------------------------ data
    def _make_sampler(
        self, sizes: list[int], batch_size: int, seed: int, num_batches: int
    ) -> MultiTaskBatchSampler:
        return MultiTaskBatchSampler(
            sizes, batch_size, self.tasks_per_step, q=self.q, seed=seed, num_batches=num_batches
        )

    def _wrap_dataset(self, dataset: Any) -> Any:
        return _TaskTagged(dataset, [0, *itertools.accumulate(self._task_sizes())])

    def _wrap_collator(self, collator: Any) -> Any:
        return _TaskTaggingCollator(collator, self.task_key)

    # ------------------------------------------------------------------ training
    def compute_task_losses(
        self, model: nn.Module, inputs: dict[str, Any], task_ids: Tensor
    ) -> list[Tensor]:
        """One scalar loss per task present in the batch, in increasing task order.

        Default: ``labels = inputs.pop("labels")``, ``outputs = model(**inputs)``,
        ``per_example = loss_fn(outputs, labels)`` of shape ``(B,)``, and for each task t the
        mean of ``per_example`` over the rows with ``task_ids == t``. Called under the
        Trainer's ``compute_loss_context_manager``; ``task_ids`` is on the model's device.
        """
        if "labels" not in inputs:
            raise ValueError(
                "the batch has no 'labels'; pass loss_fn= and a collator that provides labels, "
                "or override SurgeryTrainer.compute_task_losses"
            )
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        per_example = self.loss_fn(outputs, labels)
        if per_example.shape != task_ids.shape:
            raise ValueError(
                f"loss_fn must return one loss per example, shape {tuple(task_ids.shape)}, got "
                f"{tuple(per_example.shape)}"
            )
        return [per_example[task_ids == t].mean() for t in torch.unique(task_ids).tolist()]

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Per-task losses and ``optimizer.backward(losses)``; returns their mean, detached."""
        model.train()
        optimizer: Any = self.optimizer
        if callable(getattr(optimizer, "train", None)):  # e.g. schedule-free optimizers
            optimizer.train()
        inputs = dict(self._prepare_inputs(inputs))
        task_ids = inputs.pop(self.task_key)
        with self.compute_loss_context_manager():
            losses = self.compute_task_losses(model, inputs, task_ids)
        del inputs
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        if accumulation > 1:  # MTL only: the sum over micro-batches is the batch's gradient
            losses = [loss / accumulation for loss in losses]
        surgery = self.surgery
        if surgery is None:
            raise RuntimeError("SurgeryTrainer.training_step before the optimizer was created")
        surgery.backward(losses)
        return torch.stack([loss.detach().reshape(()) for loss in losses]).mean()
