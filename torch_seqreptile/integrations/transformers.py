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
* saves the method's whole state with each checkpoint — ``optimizer.pt`` is exactly
  ``SeqReptile.state_dict()`` (inner state, :math:`\phi`, counters), and the fast weights
  :math:`\theta` of the running trajectory go to ``seqreptile_fast_weights.safetensors`` —
  and restores it on ``train(resume_from_checkpoint=...)``; the task sampler is replayed to
  the same position, so a resumed run continues exactly like an uninterrupted one;
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
accumulation (except with ``MTL``) raise. See ``docs/transformers.md``.

This module is the public import path; the code lives in one private module per concern:

* ``_hf_deps``: the ``transformers`` import (a missing install raises ``ImportError`` saying
  what to install);
* ``_hf_common``: :func:`find_slow_optimizer`, :func:`find_surgery_optimizer`;
* ``_hf_base``: the trainer both trainers derive from (one process, the task sampler, the
  data loader, wrapping the optimizer once);
* ``_hf_seqreptile``: :class:`SeqReptileTrainer` and its checkpoint files;
* ``_hf_surgery``: :class:`SurgeryTrainer`, the task-tagging dataset and collator,
  :func:`per_example_cross_entropy`;
* ``_hf_probes``: :class:`ProbeCallback`.
"""

from __future__ import annotations

from torch_seqreptile.integrations._hf_common import find_slow_optimizer, find_surgery_optimizer
from torch_seqreptile.integrations._hf_probes import ProbeCallback
from torch_seqreptile.integrations._hf_seqreptile import FAST_WEIGHTS_NAME, SeqReptileTrainer
from torch_seqreptile.integrations._hf_surgery import SurgeryTrainer, per_example_cross_entropy

__all__ = [
    "FAST_WEIGHTS_NAME",
    "ProbeCallback",
    "SeqReptileTrainer",
    "SurgeryTrainer",
    "find_slow_optimizer",
    "find_surgery_optimizer",
    "per_example_cross_entropy",
]
