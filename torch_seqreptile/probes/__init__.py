r"""Probes of what Sequential Reptile changes: task-gradient alignment and forgetting.

* :class:`TaskGradientProbe` (:mod:`~torch_seqreptile.probes.alignment`) — the pairwise
  cosine similarity :math:`C_{ij} = \langle g_i, g_j\rangle / (\|g_i\|\,\|g_j\|)` of the
  task gradients (the paper's Fig. 4, Fig. 7a/b and the heatmap of Fig. 3h), exact or
  sketched, returned as a :class:`ProbeResult`.
* :func:`l2_distance` (:mod:`~torch_seqreptile.probes.forgetting`) —
  :math:`\|\theta - \theta_0\|_2` from the pretrained weights (Fig. 5c, 6c/d).
* :func:`masked_lm_loss` (:mod:`~torch_seqreptile.probes.forgetting`) — the
  masked-language-modelling loss with BERT's 15% masking (Fig. 5a/b, 6a/b), for any Hugging
  Face masked-LM model and tokenizer (duck-typed: this package does not import
  ``transformers``).

None of them touches ``.grad``, the optimizer or the global random number generators, and
each restores the modules' ``training`` flags, so they can run in the middle of training.
"""

from torch_seqreptile.probes.alignment import ProbeResult, TaskGradientProbe
from torch_seqreptile.probes.forgetting import l2_distance, masked_lm_loss

__all__ = [
    "ProbeResult",
    "TaskGradientProbe",
    "l2_distance",
    "masked_lm_loss",
]
