"""Sequential Reptile (Lee et al., ICLR 2022) and its baselines for PyTorch."""

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
