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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile._validation import check_int
from torch_seqreptile.probes import ProbeResult, TaskGradientProbe, l2_distance
from torch_seqreptile.sampling import TaskBatchSampler
from torch_seqreptile.seqreptile import SeqReptile

__all__ = ["EpochTaskBatchSampler", "ProbeCallback", "SeqReptileTrainer", "find_slow_optimizer"]

logger = logging.getLogger(__name__)


def find_slow_optimizer(optimizer: Any) -> SlowWeightsOptimizer | None:
    """The :class:`SeqReptile`/:class:`Reptile` inside ``optimizer`` (e.g. an
    ``accelerate`` ``AcceleratedOptimizer``), or ``None``."""
    for _ in range(8):
        if isinstance(optimizer, SlowWeightsOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


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
    """A :class:`TaskBatchSampler` that can be put at the start of any epoch.

    The Trainer calls ``set_epoch(e)`` before each epoch. In an uninterrupted run the sampler
    just continues its seeded stream; in a run resumed at epoch ``e`` the fresh sampler first
    replays (draws and discards) the index lists of epochs ``0..e-1`` — cheap, no data is
    loaded — so that its stream is where the interrupted run's was. Within the resumed epoch
    the Trainer skips the batches already trained on, which advances the stream the rest of
    the way.
    """

    def __init__(self, sampler: TaskBatchSampler) -> None:
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


class SeqReptileTrainer(Trainer):  # type: ignore[misc]
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
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError(
                "SeqReptileTrainer supports one process (world_size must be 1, got "
                f"{self.args.world_size}); see docs/transformers.md"
            )
        self.seqreptile_kwargs: dict[str, Any] = {
            "inner_steps": inner_steps,
            "outer_lr": outer_lr,
            **dict(seqreptile_kwargs or {}),
        }
        SeqReptile(  # validate now: errors name the argument
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), **self.seqreptile_kwargs
        )
        self.task_sizes = None if task_sizes is None else list(task_sizes)
        self.q = q
        self.sampler_seed = sampler_seed
        self.num_batches = None if num_batches is None else check_int("num_batches", num_batches, 1)
        self.finalize = bool(finalize)
        self.train_batch_sampler: EpochTaskBatchSampler | None = None
        # first, so that at max_steps every other callback (probes, saving) sees the end state
        self.callback_handler.callbacks.insert(0, _FinalizeCallback(self))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProbeCallback) and callback.trainer is None:
                callback.trainer = self

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer wrapped in :class:`SeqReptile` (once)."""
        if model is None:
            optimizer = super().create_optimizer()
        else:
            optimizer = super().create_optimizer(model)
        if isinstance(optimizer, _CheckpointedSeqReptile):
            return optimizer
        if find_slow_optimizer(optimizer) is not None:
            raise TypeError(
                "optimizers[0] must be the inner optimizer; SeqReptileTrainer wraps it itself "
                "(pass inner_steps/outer_lr/seqreptile_kwargs to the trainer)"
            )
        self.optimizer = _CheckpointedSeqReptile(optimizer, **self.seqreptile_kwargs)
        return self.optimizer

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
        """A DataLoader whose batches each hold one task (:class:`TaskBatchSampler`)."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset: Any = self.train_dataset
        sizes = self._task_sizes()
        if sum(sizes) != len(dataset):
            raise ValueError(
                f"task_sizes must sum to len(train_dataset)={len(dataset)}, got {sizes}"
            )
        accumulation = self.args.gradient_accumulation_steps
        batch_size = self._train_batch_size
        num_batches = self.num_batches
        if num_batches is None:
            num_batches = max(1, sum(sizes) // batch_size // accumulation) * accumulation
        seed = self.sampler_seed
        if seed is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = TaskBatchSampler(
            sizes,
            batch_size,
            q=self.q,
            seed=seed,
            num_batches=num_batches,
            steps_per_task=accumulation,
        )
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
            dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(loader)  # type: ignore[no-any-return]

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
        trainer: the Trainer to log through; :class:`SeqReptileTrainer` sets itself, a plain
            ``Trainer`` needs :meth:`attach`.

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
