r"""Sequential Reptile inside Hugging Face ``transformers.Trainer``.

:class:`SeqReptileTrainer` is a ``Trainer`` that

* draws **single-task batches** with :class:`~torch_seqreptile.TaskBatchSampler` (p_t ∝ N_t^q,
  Eq. 5) over a multi-task training set (a ``ConcatDataset`` of the task datasets, or any
  dataset ordered by task with ``task_sizes``); with gradient accumulation every optimizer
  step still sees one task (``steps_per_task = gradient_accumulation_steps``);
* wraps the optimizer the Trainer builds (or the one you pass) in
  :class:`~torch_seqreptile.SeqReptile`: each Trainer optimizer step is one inner step,
  every ``inner_steps`` of them the outer update :math:`\phi \leftarrow \phi - \eta(\phi -
  \theta_K)`, :math:`\theta \leftarrow \phi` (Alg. 1 lines 9-10). The LR scheduler acts
  on the inner learning rate :math:`\alpha`;
* **evaluates, predicts and saves the slow weights** :math:`\phi` (``evaluate``,
  ``predict``, ``save_model`` and therefore every checkpoint's model file);
* saves the wrapper's whole state with each checkpoint (``optimizer.pt``: inner state,
  :math:`\phi`, counters, and the fast weights :math:`\theta` of the running trajectory) and
  restores it on ``train(resume_from_checkpoint=...)``; the task sampler is replayed to the
  same position, so a resumed run continues exactly like an uninterrupted one;
* ends the last trajectory when training reaches ``max_steps`` (``finalize=True``), so the
  model then holds :math:`\phi`.

:class:`ProbeCallback` logs :class:`~torch_seqreptile.probes.TaskGradientProbe` results
(mean pairwise cosine, per-task gradient norms) and :func:`~torch_seqreptile.probes.l2_distance`
from the starting weights to the Trainer's loggers every N steps.

Supported: one process (CPU or one GPU), ``fp16``/``bf16`` (a step the ``GradScaler`` skips
is not an inner step), gradient accumulation. Not supported: several processes (DDP), FSDP,
DeepSpeed — the constructor raises for more than one process.

:class:`SurgeryTrainer` trains with an MTL baseline of :mod:`torch_seqreptile.surgery`
(``MTL``, ``PCGrad``, ``GradVac``, ``GradNorm``, ``CAGrad``, ``MGDA``): batches of
``tasks_per_step`` tasks from :class:`~torch_seqreptile.MultiTaskBatchSampler` that carry the
task of every example, one loss per task, ``optimizer.backward(losses)`` in ``training_step``,
the surgery state in every checkpoint. One process, ``bf16`` or float32; ``fp16`` and gradient
accumulation (except with ``MTL``) raise. Both trainers share the sampler, data loader and
optimizer-wrapping code (``_TaskSamplingTrainer``). See ``docs/transformers.md``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile._validation import check_int
from torch_seqreptile.probes import ProbeResult, TaskGradientProbe, l2_distance
from torch_seqreptile.sampling import MultiTaskBatchSampler, TaskBatchSampler
from torch_seqreptile.seqreptile import SeqReptile
from torch_seqreptile.surgery import MTL, GradientCombiner, GradNorm, GradVac

__all__ = [
    "EpochTaskBatchSampler",
    "ProbeCallback",
    "SeqReptileTrainer",
    "SurgeryTrainer",
    "find_slow_optimizer",
    "find_surgery_optimizer",
    "per_example_cross_entropy",
]

logger = logging.getLogger(__name__)


def _find_wrapped(optimizer: Any, kind: type[Optimizer]) -> Any:
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
    found: SlowWeightsOptimizer | None = _find_wrapped(optimizer, SlowWeightsOptimizer)
    return found


def find_surgery_optimizer(optimizer: Any) -> GradientCombiner | None:
    """The :mod:`~torch_seqreptile.surgery` optimizer (``PCGrad``, ``MTL``, ...) inside
    ``optimizer`` (e.g. an ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    found: GradientCombiner | None = _find_wrapped(optimizer, GradientCombiner)
    return found


class _CheckpointedSeqReptile(SeqReptile):
    """SeqReptile whose ``state_dict`` also holds the fast weights theta of the trajectory.

    The Trainer saves the model file from the slow weights phi, so theta has to travel in
    the optimizer state for a resumed run to continue the trajectory it was in.
    """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        params = list(self.params())
        state["fast"] = {i: params[i].detach() for i in sorted(self.slow)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = list(self.params())
        fast = state_dict.get("fast", {})
        for index, tensor in fast.items():
            if not 0 <= int(index) < len(params) or tensor.shape != params[int(index)].shape:
                raise ValueError(f"state_dict['fast'][{index}] does not match parameter")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for index, tensor in fast.items():
                params[int(index)].copy_(tensor)


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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    output = model(**batch)
    return output["loss"] if isinstance(output, Mapping) else output[0]  # type: ignore[no-any-return]


class _TaskSamplingTrainer(Trainer):  # type: ignore[misc]
    """What :class:`SeqReptileTrainer` and :class:`SurgeryTrainer` share: one process, a
    task sampler over the training set (replayed on resume by :class:`EpochTaskBatchSampler`)
    and the Trainer's optimizer wrapped once in the method's wrapper.

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
        self.train_batch_sampler: EpochTaskBatchSampler | None = None
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
        found = _find_wrapped(optimizer, self._wrapper_kind)
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
        self.train_batch_sampler = EpochTaskBatchSampler(sampler)
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


class SeqReptileTrainer(_TaskSamplingTrainer):
    r"""``transformers.Trainer`` training with Sequential Reptile on single-task batches.

    Args (besides the ``Trainer``'s own, all keyword-only):
        inner_steps: K, optimizer steps per outer update (paper: 1000).
        outer_lr: :math:`\eta` in [0, 1] (paper: 0.1).
        task_sizes: N_t of each task in the order of ``train_dataset``; default: the sizes of
            the datasets of a ``torch.utils.data.ConcatDataset``.
        q: p_t ∝ N_t^q (paper: 0.2).
        sampler_seed: seed of the task draws and shuffles; default ``args.data_seed`` or
            ``args.seed``.
        num_batches: batches per Trainer epoch; default sum(N_t) // batch size, rounded down
            to a multiple of ``gradient_accumulation_steps``.
        finalize: at ``max_steps``, end the current trajectory (:meth:`SeqReptile.outer_step`)
            so the model holds phi when training stops.
        seqreptile_kwargs: further keyword arguments of :class:`SeqReptile`
            (``outer_momentum``, ``reset_inner_state``, ``slow_device``, ...).

    The optimizer is the Trainer's usual one (``args.optim``) or the inner optimizer given
    in ``optimizers=(inner, scheduler)``; pass the inner optimizer, not a ``SeqReptile``.
    """

    _wrapper_kind = SlowWeightsOptimizer

    def __init__(
        self,
        *args: Any,
        inner_steps: int,
        outer_lr: float,
        task_sizes: Sequence[int] | None = None,
        q: float = 0.2,
        sampler_seed: int | None = None,
        num_batches: int | None = None,
        finalize: bool = True,
        seqreptile_kwargs: Mapping[str, Any] | None = None,
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
        self.seqreptile_kwargs: dict[str, Any] = {
            "inner_steps": inner_steps,
            "outer_lr": outer_lr,
            **dict(seqreptile_kwargs or {}),
        }
        SeqReptile(  # validate now: errors name the argument
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), **self.seqreptile_kwargs
        )
        self.finalize = bool(finalize)
        # first, so that at max_steps every other callback (probes, saving) sees the end state
        self.callback_handler.callbacks.insert(0, _FinalizeCallback(self))

    # ------------------------------------------------------------------ optimizer
    def _wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return _CheckpointedSeqReptile(optimizer, **self.seqreptile_kwargs)

    @property
    def seqreptile(self) -> SeqReptile | None:
        """The :class:`SeqReptile` wrapper once the optimizer exists, else ``None``."""
        found = find_slow_optimizer(self.optimizer)
        return found if isinstance(found, SeqReptile) else None

    def slow_weights(self) -> AbstractContextManager[None]:
        """Context with phi in the model (no-op before the first step: the model is phi)."""
        wrapper = self.seqreptile
        return wrapper.slow_weights() if wrapper is not None else nullcontext()

    def finalize_trajectory(self) -> None:
        """End the running trajectory now (phi moves toward theta, theta <- phi)."""
        wrapper = self.seqreptile
        if wrapper is not None:
            wrapper.outer_step()

    # ------------------------------------------------------------------ data
    def _make_sampler(
        self, sizes: list[int], batch_size: int, seed: int, num_batches: int
    ) -> TaskBatchSampler:
        # with gradient accumulation every optimizer step (inner step) still sees one task
        return TaskBatchSampler(
            sizes,
            batch_size,
            q=self.q,
            seed=seed,
            num_batches=num_batches,
            steps_per_task=self.args.gradient_accumulation_steps,
        )

    # ------------------------------------------------------------------ slow weights out
    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` on the slow weights phi."""
        with self.slow_weights():
            return super().evaluate(*args, **kwargs)  # type: ignore[no-any-return]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` on the slow weights phi."""
        with self.slow_weights():
            return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` of the slow weights phi (also inside checkpoints)."""
        with self.slow_weights():
            super().save_model(output_dir, _internal_call)


# ---------------------------------------------------------------------- MTL baselines
class _TaskTagged(Dataset[tuple[int, Any]]):
    """``dataset[i]`` together with the task of ``i``: ``(task, example)``."""

    def __init__(self, dataset: Any, offsets: list[int]) -> None:
        self.dataset = dataset
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return bisect.bisect_right(self.offsets, index) - 1, self.dataset[index]


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


class SurgeryTrainer(_TaskSamplingTrainer):
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

    Args (besides the ``Trainer``'s own, all keyword-only):
        method: a :class:`~torch_seqreptile.surgery.GradientCombiner` subclass (e.g.
            ``PCGrad``), built as ``method(optimizer, num_tasks=tasks_per_step, **method_kwargs)``
            (plus ``seed=args.seed`` for PCGrad/GradVac unless given), or a callable
            ``optimizer -> GradientCombiner`` that wraps the optimizer it is given.
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


class _FinalizeCallback(TrainerCallback):  # type: ignore[misc]
    def __init__(self, trainer: SeqReptileTrainer) -> None:
        self.trainer = trainer

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer.finalize and state.global_step >= state.max_steps:
            self.trainer.finalize_trajectory()


class ProbeCallback(TrainerCallback):  # type: ignore[misc]
    r"""Log task-gradient alignment and the distance from the start to the Trainer's loggers.

    Every ``every_n_steps`` optimizer steps it runs :class:`TaskGradientProbe` on the fixed
    ``probe_batches`` (one batch per task) and calls ``trainer.log`` with
    ``probe/mean_cosine`` (:math:`\bar c`), ``probe/grad_norm/task_t`` and
    ``probe/l2_distance`` (:math:`\|\phi-\theta_0\|_2`). By default it measures the slow
    weights phi (what is evaluated and saved). Training is not disturbed: ``.grad``, the
    modules' flags and the RNG streams are left as they were.

    Args:
        probe_batches: one batch per task (dicts of tensors; moved to the model's device).
        every_n_steps: int >= 1.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        params: the probed parameters: a module, tensors, or a callable
            ``model -> module | tensors`` (e.g. ``lambda m: m.bert.encoder``); default all
            trainable parameters.
        mode, sketch_dim, seed, max_memory_bytes: those of :class:`TaskGradientProbe`.
        reference: theta_0 for the l2 distance (a module or a mapping name -> tensor,
            compared on the names both hold); default a copy of the model's parameters taken
            when training begins. When resuming, pass it: the default would be the resumed
            weights, so the distance is then not logged.
        slow_weights: probe phi (``True``) or the fast weights theta.
        trainer: the Trainer to log through; :class:`SeqReptileTrainer` and
            :class:`SurgeryTrainer` set themselves, a plain ``Trainer`` needs :meth:`attach`.

    ``history`` keeps ``(step, ProbeResult, l2 distance or None)`` of every probe.
    """

    def __init__(
        self,
        probe_batches: Sequence[Any],
        *,
        every_n_steps: int,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | Callable[[nn.Module], Any] | None = None,
        mode: str = "exact",
        sketch_dim: int = 8192,
        seed: int = 0,
        max_memory_bytes: int | None = 1 << 30,
        reference: nn.Module | Mapping[str, Tensor] | None = None,
        slow_weights: bool = True,
        trainer: Trainer | None = None,
    ) -> None:
        if isinstance(probe_batches, (str, bytes)) or not isinstance(probe_batches, Sequence):
            raise TypeError("probe_batches must be a sequence with one batch per task")
        if len(probe_batches) < 2:
            raise ValueError(f"probe_batches must hold at least 2 tasks, got {len(probe_batches)}")
        self.probe_batches = list(probe_batches)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.loss_fn = loss_fn or _default_loss
        self.params = params
        self.probe_kwargs: dict[str, Any] = {
            "mode": mode,
            "sketch_dim": sketch_dim,
            "seed": seed,
            "max_memory_bytes": max_memory_bytes,
        }
        self.reference: nn.Module | Mapping[str, Tensor] | None = reference
        self._own_reference = reference is None
        self.slow_weights = bool(slow_weights)
        self.trainer = trainer
        self.history: list[tuple[int, ProbeResult, float | None]] = []

    def attach(self, trainer: Trainer) -> ProbeCallback:
        """Log through ``trainer`` and add this callback to it."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if self._own_reference and model is not None:
            if state.global_step > 0:
                logger.warning(
                    "ProbeCallback: resumed run without reference=; l2 distance is not logged"
                )
                self.reference = None
            else:
                self.reference = {name: p.detach().clone() for name, p in model.named_parameters()}

    def measure(self, model: nn.Module, optimizer: Any = None) -> tuple[ProbeResult, float | None]:
        """Run the probe (and the l2 distance) on ``model`` now; returns both."""
        slow = find_slow_optimizer(optimizer) if self.slow_weights else None
        params = self.params(model) if callable(self.params) else self.params
        device = next(model.parameters()).device
        batches = [_to_device(b, device) for b in self.probe_batches]
        with slow.slow_weights() if slow is not None else nullcontext():
            probe = TaskGradientProbe(model, params, **self.probe_kwargs)
            result = probe.compute(batches, self.loss_fn)
            distance = (
                None if self.reference is None else l2_distance(model, self.reference, strict=False)
            )
        return result, distance

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step % self.every_n_steps != 0:
            return
        model = kwargs.get("model")
        if model is None:
            return
        result, distance = self.measure(model, kwargs.get("optimizer"))
        self.history.append((state.global_step, result, distance))
        logs = result.as_dict()
        if distance is not None:
            logs["probe/l2_distance"] = distance
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})
