"""Sequential Reptile (Lee et al., ICLR 2022) and its baselines for PyTorch.

The submodules ``probes``, ``streaming`` (needs torchdata: the ``[stream]`` extra) and
``integrations`` are imported on first use, e.g. ``torch_seqreptile.probes.TaskGradientProbe``
(PEP 562); ``import torch_seqreptile`` imports none of them (``distributed`` it imports, for
``Reptile``).
"""

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from torch_seqreptile import surgery
from torch_seqreptile.recadam import RecAdam
from torch_seqreptile.reptile import Reptile
from torch_seqreptile.sampling import (
    MultiTaskBatchSampler,
    TaskBatchSampler,
    task_of,
    task_probabilities,
)
from torch_seqreptile.seqreptile import SeqReptile

__version__ = "0.2.0.dev0"

__all__ = [
    "MultiTaskBatchSampler",
    "RecAdam",
    "Reptile",
    "SeqReptile",
    "TaskBatchSampler",
    "surgery",
    "task_of",
    "task_probabilities",
]

_LAZY_SUBMODULES = frozenset({"integrations", "probes", "streaming"})

if TYPE_CHECKING:
    from torch_seqreptile import integrations as integrations
    from torch_seqreptile import probes as probes
    from torch_seqreptile import streaming as streaming
else:

    def __getattr__(name: str) -> ModuleType:
        if name in _LAZY_SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
