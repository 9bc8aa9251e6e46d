"""Reptile for MTL (Nichol et al., 2018): the baseline of Lee et al. (2022), Eq. 2-3."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile._validation import check_int


class Reptile(SlowWeightsOptimizer):
    r"""Reptile with one inner trajectory per task, all starting from the same phi.

    For each task t = 0, ..., T-1 in turn, ``inner_steps`` calls of :meth:`step` run
    :math:`\theta_t^{(0)}=\phi,\ \theta_t^{(k)}=\mathrm{InnerStep}(\theta_t^{(k-1)},
    \mathcal{B}_t^{(k)})` (Eq. 2) on batches of task t only; after the last task

    .. math::
        \phi \leftarrow \phi - \eta\,\frac{1}{T}\sum_{t=1}^{T}(\phi - \theta_t^{(K)}),
        \qquad \theta \leftarrow \phi \qquad \text{(Eq. 3).}

    :attr:`current_task` tells the training loop which task the next batch must come from
    (``TaskBatchSampler(..., task_order="cyclic", steps_per_task=inner_steps)`` yields
    exactly that order). Its gradient alignment is only *within* a task (Eq. 4).

    Args are those of :class:`~torch_seqreptile.SeqReptile`, plus ``num_tasks`` (T).
    Memory: two copies of the trainable parameters (phi and the sum of trajectory ends).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        inner_steps: int,
        outer_lr: float,
        num_tasks: int,
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
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        self.current_task = 0
        self.endpoint_sums: dict[int, Tensor] = {}

    @torch.no_grad()
    def _on_track(self, index: int, param: Tensor) -> None:
        # Trajectories already finished this round left this parameter at phi.
        self.endpoint_sums[index] = self.slow[index] * self.current_task

    @torch.no_grad()
    def _add_endpoint(self) -> None:
        indices, _, fast = self._tracked()
        for i, f in zip(indices, fast):
            total = self.endpoint_sums[i]
            total.add_(f.to(total.device, non_blocking=True))
        self.current_task += 1

    @torch.no_grad()
    def _finish_round(self) -> None:
        indices = sorted(self.endpoint_sums)
        sums = [self.endpoint_sums[i] for i in indices]
        torch._foreach_div_(sums, float(self.current_task))
        self._outer_update(target=self.endpoint_sums)
        torch._foreach_zero_(sums)
        self.current_task = 0

    def _after_inner_step(self) -> None:
        if self.trajectory_step < self.inner_steps:
            return
        self._add_endpoint()
        if self.current_task == self.num_tasks:
            self._finish_round()
        else:
            self._restart_trajectory()

    def outer_step(self) -> None:
        """End the round now: phi moves toward the mean end point of the trajectories so far.

        A trajectory in progress counts as finished. Does nothing if no inner step was
        taken since the last outer update.
        """
        if self.trajectory_step > 0:
            self._add_endpoint()
        if self.current_task > 0:
            self._finish_round()

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_tasks": self.num_tasks}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(current_task=self.current_task, endpoint_sums=dict(self.endpoint_sums))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_state_dict_kind(state_dict)
        if set(state_dict.get("endpoint_sums", {})) != set(state_dict.get("slow", {})):
            raise ValueError("state_dict['endpoint_sums'] must have the keys of state_dict['slow']")
        super().load_state_dict(state_dict)
        self.current_task = int(state_dict["current_task"])
        self.endpoint_sums = {
            int(i): t.to(self.slow[int(i)], copy=True)
            for i, t in state_dict["endpoint_sums"].items()
        }
