"""Sequential Reptile (Lee et al., ICLR 2022, Sec. 3.1 and Algorithm 1)."""

from __future__ import annotations

from typing import Any

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
            Keys the inner optimizer lists in ``persistent_state_keys`` (RecAdam's
            ``pretrained``) are kept.
        slow_device: where phi lives (e.g. ``"cpu"`` for a GPU model); default: with
            each parameter.
        slow_dtype: dtype of phi and the outer buffers; default float32 for float16 and
            bfloat16 parameters (so that an outer step below half a bf16 ulp is not lost),
            the parameter's dtype otherwise. theta is rounded from phi after every outer
            update.
        outer_impl: kernel of the outer update: ``"foreach"`` (default),
            ``"compiled"`` (``torch.compile``, one pass over memory; compiles on first
            use), or ``"per_tensor"``. All agree to rounding.
        reject_nonfinite: raise ``ValueError`` before an inner step whose gradients contain
            inf or NaN, leaving everything unchanged (one host-device sync per step and
            device).

    The outer hyperparameters are keys of every param group (``inner_steps``, ``outer_lr``,
    ``outer_momentum``, ``outer_nesterov``, ``reset_inner_state``), so they can differ between
    groups and change during training as ``lr`` does; each group counts its own
    ``trajectory_step`` and does its outer update when that reaches its ``inner_steps``.
    ``state[p]["slow_weight"]`` is phi (``state[p]["outer_momentum_buffer"]`` the momentum).

    Example:
        Two inner SGD steps (lr 1) on :math:`\tfrac12\|\theta - c_t\|^2`, one task each, then
        the outer update with :math:`\eta = 0.5`:

        >>> import torch
        >>> from torch_seqreptile import SeqReptile
        >>> theta = torch.nn.Parameter(torch.zeros(2))
        >>> opt = SeqReptile(torch.optim.SGD([theta], lr=1.0), inner_steps=2, outer_lr=0.5)
        >>> for center in ([1.0, 0.0], [0.0, 1.0]):
        ...     theta.grad = theta.detach() - torch.tensor(center)
        ...     opt.step()
        >>> theta.tolist()  # theta_2 = [0, 1]; phi = 0 - 0.5 * (0 - theta_2); theta <- phi
        [0.0, 0.5]

    Memory: one copy of the trainable parameters (phi; float32 for low-precision ones), plus
    one more with momentum.
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
        slow_dtype: torch.dtype | None = None,
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
            slow_dtype=slow_dtype,
            outer_impl=outer_impl,
            reject_nonfinite=reject_nonfinite,
        )

    def _after_inner_step(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            if group["trajectory_step"] >= group["inner_steps"]:
                self._outer_update(group, targets=None)

    def outer_step(self) -> None:
        """End the current trajectory now: phi moves toward theta, theta <- phi.

        Call it after the last training batch so that the model holds the slow weights.
        Does nothing for a group that took no inner step since its last outer update.
        """
        for group in self._checked_groups():
            if group["trajectory_step"] > 0:
                self._outer_update(group, targets=None)
