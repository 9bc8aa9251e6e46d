"""Sequential Reptile (Lee et al., ICLR 2022, Sec. 3.1 and Algorithm 1)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from torch_seqreptile._meta import SlowWeightsOptimizer


class SeqReptile(SlowWeightsOptimizer):
    r"""Sequential Reptile around any ``torch.optim.Optimizer``.

    One inner trajectory runs over mini-batches of *different* tasks, one task per batch
    (Eq. 5, Algorithm 1 lines 4-8); every ``inner_steps`` calls of :meth:`step` the slow
    weights move toward its end (Eq. 6, Algorithm 1 lines 9-10):

    .. math::
        \theta^{(0)} = \phi,\quad
        \theta^{(k)} = \mathrm{InnerStep}(\theta^{(k-1)}, \mathcal{B}_{t_k}^{(k)}),\quad
        \phi \leftarrow \phi - \eta\,(\phi - \theta^{(K)}),\quad \theta \leftarrow \phi.

    To first order the expected meta-gradient minimises the summed task losses minus
    :math:`\tfrac{\alpha}{2}\sum_k\sum_{j<k}\langle g_{t_k}, g_{t_j}\rangle` (Eq. 7), i.e.
    it aligns gradients of different tasks. Feed one task per batch, e.g. with
    :class:`~torch_seqreptile.TaskBatchSampler`.

    Args:
        optimizer: the inner optimizer (AdamW in the paper); its ``param_groups`` and
            ``state`` are shared, so LR schedulers act on the inner learning rate alpha.
        inner_steps: K, inner steps per outer update (paper: 1000).
        outer_lr: eta in [0, 1] (paper: 0.1). ``1`` is plain training with ``optimizer``;
            ``0`` never moves phi.
        outer_momentum: heavy-ball momentum on the meta-gradient, in [0, 1). Beyond the paper.
        nesterov: Nesterov form of the outer momentum. Beyond the paper.
        reset_inner_state: clear the inner optimizer's state (e.g. Adam moments and step
            counts) at every outer update. Default ``False`` keeps it across trajectories.
        slow_device: where phi lives (e.g. ``"cpu"`` for a GPU model); default: with
            each parameter.
        outer_impl: kernel of the outer update: ``"foreach"`` (default),
            ``"compiled"`` (``torch.compile``, one pass over memory; compiles on first
            use), or ``"per_tensor"``. All agree to rounding.
        reject_nonfinite: raise ``ValueError`` before an inner step whose gradients contain
            inf or NaN, leaving everything unchanged (costs one host-device sync per step).

    Memory: one copy of the trainable parameters (phi), plus one more with momentum.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        inner_steps: int,
        outer_lr: float,
        *,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        reset_inner_state: bool = False,
        slow_device: torch.device | str | None = None,
        outer_impl: str = "foreach",
        reject_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            optimizer,
            inner_steps,
            outer_lr,
            outer_momentum=outer_momentum,
            nesterov=nesterov,
            reset_inner_state=reset_inner_state,
            slow_device=slow_device,
            outer_impl=outer_impl,
            reject_nonfinite=reject_nonfinite,
        )

    def _after_inner_step(self) -> None:
        if self.trajectory_step == self.inner_steps:
            self._outer_update(target=None)

    def outer_step(self) -> None:
        """End the current trajectory now: phi moves toward theta, theta <- phi.

        Call it after the last training batch so that the model holds the slow weights.
        Does nothing if no inner step was taken since the last outer update.
        """
        if self.trajectory_step > 0:
            self._outer_update(target=None)
