"""Multi-task gradient-combination baselines with a ``torch.optim`` interface.

Each class wraps any ``torch.optim.Optimizer``, is one itself (shared ``param_groups``, so
LR schedulers work) and adds ``backward(losses)``: one scalar loss per task, then the usual
``step()``. See ``docs/baselines.md``.
"""

from torch_seqreptile.surgery._base import GradientCombiner, GramianCombiner, TaskGramians
from torch_seqreptile.surgery.cagrad import CAGrad, cagrad_weights
from torch_seqreptile.surgery.gradnorm import GradNorm, gradnorm_weight_grad
from torch_seqreptile.surgery.gradvac import GradVac, gradvac_weights
from torch_seqreptile.surgery.mgda import MGDA, min_norm_weights
from torch_seqreptile.surgery.mtl import MTL, mtl_weights
from torch_seqreptile.surgery.pcgrad import PCGrad, pcgrad_coefficients, pcgrad_weights

__all__ = [
    "MGDA",
    "MTL",
    "CAGrad",
    "GradNorm",
    "GradVac",
    "GradientCombiner",
    "GramianCombiner",
    "PCGrad",
    "TaskGramians",
    "cagrad_weights",
    "gradnorm_weight_grad",
    "gradvac_weights",
    "min_norm_weights",
    "mtl_weights",
    "pcgrad_coefficients",
    "pcgrad_weights",
]
