"""Reptile for MTL (Nichol et al., 2018): the baseline of Lee et al. (2022), Eq. 2-3."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._meta import SlowWeightsOptimizer
from torch_seqreptile._validation import check_int
from torch_seqreptile._wrapper import clone_to
from torch_seqreptile.distributed import all_reduce_sum_, group_rank_and_size, local_tensor


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

    **Parallel trajectories** (``parallel=True``): the T trajectories of a round run on the
    P ranks of ``process_group`` at the same time, all from the same phi. Rank r runs the
    trajectories of tasks r, r+P, r+2P, ... one after another (T/P of them) when P divides
    T, or the one trajectory of task r mod T when T divides P (the P/T ranks of a task
    may form a DDP group of their own, or run that task on different data). At the end of
    a round every rank sums its end points and the sums are all-reduced, so with
    :math:`S=\max(T,P)` trajectories in all

    .. math::
        \phi \leftarrow \phi - \eta\,\frac{1}{S}\sum_{r=0}^{P-1}
        \sum_{t \in \mathcal{T}_r}(\phi - \theta_t^{(K)}),\qquad \theta\leftarrow\phi
        \qquad \text{(Eq. 3, parallel form)},

    the same update on every rank: ranks hold identical phi and theta after each round.
    It equals serial Reptile on the same trajectories when no inner-optimizer state is
    carried from one trajectory to the next (``reset_inner_state=True``, or a stateless
    inner optimizer); otherwise each rank keeps its own inner state (see
    ``docs/distributed.md``). :attr:`current_task` is this rank's task.

    Args are those of :class:`~torch_seqreptile.SeqReptile`, plus ``num_tasks`` (T),
    ``parallel`` and ``process_group`` (the group that averages end points; ``None``:
    the default group; only with ``parallel=True``).
    Memory: two copies of the trainable parameters (phi and the sum of trajectory ends);
    in parallel mode the all-reduce adds one transient 64 MiB bucket
    (:data:`torch_seqreptile.distributed.BUCKET_BYTES`).
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
        parallel: bool = False,
        process_group: Any = None,
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
        if process_group is not None and not parallel:
            raise ValueError("process_group is only used with parallel=True")
        self.parallel = bool(parallel)
        self.process_group = process_group
        self.rank, self.group_size = group_rank_and_size(process_group) if parallel else (0, 1)
        if self.num_tasks % self.group_size and self.group_size % self.num_tasks:
            raise ValueError(
                f"num_tasks must be a multiple or a divisor of the process group size "
                f"{self.group_size} with parallel=True, got {num_tasks}"
            )
        # Trajectories each rank runs per round, and how many it finished in this round.
        self.trajectories_per_round = max(1, self.num_tasks // self.group_size)
        self.trajectory_index = 0
        self.endpoint_sums: dict[int, Tensor] = {}

    @property
    def current_task(self) -> int:
        """The task whose batches the next :meth:`step` must see (this rank's, if parallel)."""
        return (self.rank + self.group_size * self.trajectory_index) % self.num_tasks

    @torch.no_grad()
    def _on_track(self, index: int, param: Tensor) -> None:
        # Trajectories already finished this round left this parameter at phi.
        self.endpoint_sums[index] = self.slow[index] * self.trajectory_index

    @torch.no_grad()
    def _add_endpoint(self) -> None:
        indices, _, fast = self._tracked()
        for i, f in zip(indices, fast):
            total = self.endpoint_sums[i]
            total.add_(f.to(total.device, non_blocking=True))
        self.trajectory_index += 1

    @torch.no_grad()
    def _finish_round(self) -> None:
        count = self._all_reduce_endpoints() if self.parallel else self.trajectory_index
        sums = [local_tensor(self.endpoint_sums[i]) for i in sorted(self.endpoint_sums)]
        torch._foreach_div_(sums, float(count))
        self._outer_update(target=self.endpoint_sums)
        torch._foreach_zero_(sums)
        self.trajectory_index = 0

    @torch.no_grad()
    def _all_reduce_endpoints(self) -> int:
        """Sum the end points over the process group; return the number of trajectories.

        A parameter that had no gradient on this rank but had one on another (e.g. the head
        of another rank's task) gets its slow copy now: every trajectory of this rank ended
        at phi for it. Two collectives: one small (flags and counts), one of the end points.
        """
        params = list(self.params())
        flags = torch.zeros(len(params) + 1, dtype=torch.int64)
        flags[sorted(self.slow)] = 1
        flags[-1] = self.trajectory_index
        device = local_tensor(params[0]).device if params else flags.device
        flags = flags.to(device)
        torch.distributed.all_reduce(flags, group=self.process_group)
        for index in flags[:-1].nonzero().flatten().tolist():
            if index not in self.slow:
                self.slow[index] = clone_to(params[index], self.slow_device)
                self._on_track(index, params[index])
        self._untracked = [i for i in self._untracked if i not in self.slow]
        all_reduce_sum_(
            [self.endpoint_sums[i] for i in sorted(self.endpoint_sums)], self.process_group
        )
        return int(flags[-1])

    def _after_inner_step(self) -> None:
        if self.trajectory_step < self.inner_steps:
            return
        self._add_endpoint()
        if self.trajectory_index == self.trajectories_per_round:
            self._finish_round()
        else:
            self._restart_trajectory()

    def outer_step(self) -> None:
        """End the round now: phi moves toward the mean end point of the trajectories so far.

        A trajectory in progress counts as finished. Does nothing if no inner step was
        taken since the last outer update. With ``parallel=True`` it is a collective: every
        rank of the group must call it.
        """
        if self.trajectory_step > 0:
            self._add_endpoint()
        if self.trajectory_index > 0:
            self._finish_round()

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_tasks": self.num_tasks}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            current_task=self.current_task,
            trajectory_index=self.trajectory_index,
            group_size=self.group_size,
            endpoint_sums=dict(self.endpoint_sums),
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_state_dict_kind(state_dict)
        if set(state_dict.get("endpoint_sums", {})) != set(state_dict.get("slow", {})):
            raise ValueError("state_dict['endpoint_sums'] must have the keys of state_dict['slow']")
        if int(state_dict.get("group_size", 1)) != self.group_size:
            raise ValueError(
                f"state_dict was saved by Reptile over {state_dict.get('group_size', 1)} "
                f"parallel rank(s), this one runs over {self.group_size}"
            )
        super().load_state_dict(state_dict)
        self.trajectory_index = int(state_dict.get("trajectory_index", state_dict["current_task"]))
        self.endpoint_sums = {
            int(i): t.to(self.slow[int(i)], copy=True)
            for i, t in state_dict["endpoint_sums"].items()
        }
