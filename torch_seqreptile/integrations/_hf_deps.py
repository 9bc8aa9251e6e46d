"""The optional dependency of the ``transformers`` integration, imported in one place.

Every module of the integration takes the ``transformers`` names it needs from here, so that
a missing install fails with one message that says what to install.
"""

from __future__ import annotations

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "torch_seqreptile.integrations.transformers needs Hugging Face transformers and "
        'accelerate: pip install "torch-seqreptile[hf]"'
    ) from error

__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
]
