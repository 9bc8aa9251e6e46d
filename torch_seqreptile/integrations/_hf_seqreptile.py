r"""Sequential Reptile in the Trainer: :class:`SeqReptileTrainer`.

Single-task batches from :class:`~torch_seqreptile.TaskBatchSampler`, the Trainer's optimizer
wrapped in a plain :class:`~torch_seqreptile.SeqReptile`, evaluation/prediction/saving on the
slow weights phi, and checkpoints a resumed run continues exactly from. A checkpoint folder
holds, besides the Trainer's own files:

* the model file (``model.safetensors``): phi;
* ``optimizer.pt``: exactly ``SeqReptile.state_dict()`` (the inner optimizer's state with
  ``slow_weight`` merged into every tracked parameter's entry, the param groups with the outer
  hyperparameters and ``trajectory_step``), loadable into any ``SeqReptile`` built around the
  same inner optimizer;
* :data:`~torch_seqreptile.integrations.transformers.FAST_WEIGHTS_NAME`: the fast weights theta of the running trajectory, parameter
  name -> tensor, for the parameters SeqReptile tracks (theta = phi for the others).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile.integrations._hf_base import TaskSamplingTrainer
from torch_seqreptile.integrations._hf_common import find_slow_optimizer
from torch_seqreptile.integrations._hf_deps import (
    PREFIX_CHECKPOINT_DIR,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from torch_seqreptile.sampling import TaskBatchSampler
from torch_seqreptile.seqreptile import SeqReptile

__all__ = ["FAST_WEIGHTS_NAME", "SeqReptileTrainer"]

#: the file of a checkpoint folder that holds theta (safetensors, parameter name -> tensor)
FAST_WEIGHTS_NAME = "seqreptile_fast_weights.safetensors"


class SeqReptileTrainer(TaskSamplingTrainer):
    r"""``transformers.Trainer`` training with Sequential Reptile on single-task batches.

    Besides the ``Trainer``'s own arguments, all keyword-only:

    Args:
        inner_steps: K, optimizer steps per outer update (paper: 1000).
        outer_lr: :math:`\eta` in [0, 1] (paper: 0.1).
        task_sizes: N_t of each task in the order of ``train_dataset``; default: the sizes of
            the datasets of a ``torch.utils.data.ConcatDataset``.
        q: p_t ∝ N_t^q (paper: 0.2).
        sampler_seed: seed of the task draws and shuffles; default ``args.data_seed`` or
            ``args.seed``.
        num_batches: batches per Trainer epoch; default sum(N_t) // batch size, rounded down
            to a multiple of ``gradient_accumulation_steps``.
        finalize: at ``max_steps``, end the current trajectory (:meth:`~torch_seqreptile.SeqReptile.outer_step`)
            so the model holds phi when training stops.
        seqreptile_kwargs: further keyword arguments of :class:`~torch_seqreptile.SeqReptile`
            (``outer_momentum``, ``reset_inner_state``, ``slow_device``, ...).

    The optimizer is the Trainer's usual one (``args.optim``) or the inner optimizer given
    in ``optimizers=(inner, scheduler)``; pass the inner optimizer, not a ``SeqReptile``.
    Every parameter it optimises must be a parameter of the model (theta is checkpointed by
    parameter name).

    Checkpoints: the model file holds phi, ``optimizer.pt`` is ``SeqReptile.state_dict()``
    and :data:`~torch_seqreptile.integrations.transformers.FAST_WEIGHTS_NAME` holds theta; ``train(resume_from_checkpoint=...)`` puts
    theta back into the model after the Trainer has loaded the model (phi) and the optimizer.
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
        wrapper = SeqReptile(optimizer, **self.seqreptile_kwargs)
        self._parameter_names(wrapper)  # fail now, not at the first checkpoint
        return wrapper

    @property
    def seqreptile(self) -> SeqReptile | None:
        """The :class:`~torch_seqreptile.SeqReptile` wrapper once the optimizer exists, else ``None``."""
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

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's ``optimizer.pt`` (``SeqReptile.state_dict()``) and scheduler, then
        theta in :data:`~torch_seqreptile.integrations.transformers.FAST_WEIGHTS_NAME`."""
        super()._save_optimizer_and_scheduler(output_dir)
        self._save_fast_weights(output_dir)

    def _tune_save_checkpoint(self, checkpoint_dir: str) -> None:
        # hyperparameter search writes optimizer.pt without _save_optimizer_and_scheduler
        super()._tune_save_checkpoint(checkpoint_dir)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._save_fast_weights(os.path.join(checkpoint_dir, folder))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's loading of ``optimizer.pt`` and the scheduler, then theta into the
        model (which the Trainer has loaded with phi), if the optimizer state was loaded."""
        wrapper = self.seqreptile
        if checkpoint is None or wrapper is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        loaded: list[bool] = []
        handle = wrapper.register_load_state_dict_post_hook(lambda _: loaded.append(True))
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            handle.remove()
        if loaded:
            self._load_fast_weights(wrapper, checkpoint)

    def _parameter_names(self, wrapper: SeqReptile) -> dict[int, str]:
        """``id(parameter) -> name`` in the model for every parameter of ``wrapper``."""
        model = self.model
        if model is None:
            raise RuntimeError("SeqReptileTrainer has no model yet")
        names = {id(p): name for name, p in model.named_parameters()}
        foreign = [i for i, p in enumerate(wrapper.params()) if id(p) not in names]
        if foreign:
            raise ValueError(
                f"the optimizer's parameters {foreign} (in param_groups order) are not "
                "parameters of the model; SeqReptileTrainer checkpoints the fast weights by "
                "parameter name"
            )
        return names

    def _fast_weights(self, wrapper: SeqReptile) -> dict[str, Tensor]:
        """theta of the parameters ``wrapper`` tracks (has phi for), by name, on the CPU."""
        names = self._parameter_names(wrapper)
        return {
            names[id(p)]: p.detach().cpu().contiguous()
            for p in wrapper.params()
            if p in wrapper.state
        }

    def _save_fast_weights(self, output_dir: str) -> None:
        wrapper = self.seqreptile
        if wrapper is None or not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_file(
            self._fast_weights(wrapper),
            os.path.join(output_dir, FAST_WEIGHTS_NAME),
            metadata={"format": "pt"},
        )

    def _load_fast_weights(self, wrapper: SeqReptile, checkpoint: str) -> None:
        """Copy the checkpoint's theta into the model; validated first, all or nothing."""
        path = os.path.join(checkpoint, FAST_WEIGHTS_NAME)
        if not os.path.isfile(path):
            steps = [group["trajectory_step"] for group in wrapper.param_groups]
            if any(steps):
                raise FileNotFoundError(
                    f"{checkpoint} was saved inside a trajectory (trajectory_step {steps}) but "
                    f"has no {FAST_WEIGHTS_NAME}: without the fast weights theta the run "
                    "cannot continue it"
                )
            return  # between trajectories theta = phi, which the model file holds
        names = self._parameter_names(wrapper)
        tracked = {names[id(p)]: p for p in wrapper.params() if p in wrapper.state}
        saved = load_file(path)
        if saved.keys() != tracked.keys():
            raise ValueError(
                f"{path} does not match optimizer.pt: theta without slow weights for "
                f"{sorted(saved.keys() - tracked.keys())}, slow weights without theta for "
                f"{sorted(tracked.keys() - saved.keys())}"
            )
        for name, tensor in saved.items():
            if tensor.shape != tracked[name].shape:
                raise ValueError(
                    f"{path}[{name!r}] has shape {tuple(tensor.shape)}, the parameter "
                    f"{tuple(tracked[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in saved.items():
                tracked[name].copy_(tensor)


class _FinalizeCallback(TrainerCallback):  # type: ignore[misc]
    def __init__(self, trainer: SeqReptileTrainer) -> None:
        self.trainer = trainer

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer.finalize and state.global_step >= state.max_steps:
            self.trainer.finalize_trajectory()
