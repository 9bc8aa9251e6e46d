r"""Probe logging in the Trainer: :class:`ProbeCallback`.

Every N optimizer steps it runs :class:`~torch_seqreptile.probes.TaskGradientProbe` (mean
pairwise cosine, per-task gradient norms) and :func:`~torch_seqreptile.probes.l2_distance`
from the starting weights, on the slow weights phi of a :class:`SeqReptile` by default, and
logs them through the Trainer's loggers. Works with any ``transformers.Trainer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from torch_seqreptile._validation import check_int
from torch_seqreptile.integrations._hf_common import find_slow_optimizer
from torch_seqreptile.integrations._hf_deps import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from torch_seqreptile.probes import ProbeResult, TaskGradientProbe, l2_distance

__all__ = ["ProbeCallback"]

# the public module's name, which users filter on
logger = logging.getLogger("torch_seqreptile.integrations.transformers")


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


class ProbeCallback(TrainerCallback):  # type: ignore[misc]
    r"""Log task-gradient alignment and the distance from the start to the Trainer's loggers.

    Every ``every_n_steps`` optimizer steps it runs :class:`~torch_seqreptile.probes.TaskGradientProbe` on the fixed
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
        mode, sketch_dim, seed, max_memory_bytes: those of :class:`~torch_seqreptile.probes.TaskGradientProbe`.
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
