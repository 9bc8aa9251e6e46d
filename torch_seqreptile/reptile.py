"""Reptile for MTL (Nichol et al., 2018): the baseline of Lee et al. (2022), Eq. 2-3."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torch_seqreptile._meta import SLOW_WEIGHT, SlowWeightsOptimizer
from torch_seqreptile._validation import check_bool, check_int
from torch_seqreptile.distributed import all_reduce_sum_, group_rank_and_size, local_tensor

#: key of a parameter's sum of trajectory end points in ``state[p]``
ENDPOINT_SUM = "endpoint_sum"


class Reptile(SlowWeightsOptimizer):
    r"""Reptile with one inner trajectory per task, all starting from the same phi.

    For each task t = 0, ..., T-1 in turn, ``inner_steps`` calls of :meth:`~torch_seqreptile.Reptile.step` run
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

    State: as :class:`~torch_seqreptile.SeqReptile`, plus ``state[p]["endpoint_sum"]`` (the
    sum of the finished trajectories' end points of this round) and, in every param group,
    ``num_tasks``, ``trajectory_index`` (trajectories finished this round) and
    ``process_group_size``. All groups share one schedule: their ``inner_steps`` and
    ``num_tasks`` must be equal.

    Example:
        One SGD step (lr 1) per task on :math:`\tfrac12\|\theta - c_t\|^2` ends each
        trajectory at :math:`c_t`; with :math:`\eta = 1` phi becomes their mean:

        >>> import torch
        >>> from torch_seqreptile import Reptile
        >>> theta = torch.nn.Parameter(torch.zeros(2))
        >>> opt = Reptile(torch.optim.SGD([theta], lr=1.0), 1, outer_lr=1.0, num_tasks=2)
        >>> centers = [[2.0, 0.0], [0.0, 4.0]]
        >>> for _ in range(2):
        ...     theta.grad = theta.detach() - torch.tensor(centers[opt.current_task])
        ...     opt.step()
        >>> theta.tolist()
        [1.0, 2.0]

    Memory: two copies of the trainable parameters (phi and the sum of trajectory ends);
    in parallel mode the all-reduce adds one transient 64 MiB bucket
    (:data:`torch_seqreptile.distributed.BUCKET_BYTES`).
    """

    _state_keys = (*SlowWeightsOptimizer._state_keys, ENDPOINT_SUM)
    _counters = (*SlowWeightsOptimizer._counters, "trajectory_index", "process_group_size")
    _hyperparameters = (*SlowWeightsOptimizer._hyperparameters, "num_tasks")

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
        slow_dtype: torch.dtype | None = None,
        outer_impl: str = "foreach",
        reject_nonfinite: bool = False,
        parallel: bool = False,
        process_group: Any = None,
    ) -> None:
        if process_group is not None and not parallel:
            raise ValueError("process_group is only used with parallel=True")
        self.parallel = check_bool("parallel", parallel)
        self.process_group = process_group
        self.rank, self.group_size = group_rank_and_size(process_group) if parallel else (0, 1)
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
            extra_defaults={"num_tasks": num_tasks},
        )

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict[str, Any], where: str) -> None:
        super()._check_group(group, where)
        name = f"{where}['num_tasks']" if where else "num_tasks"
        num_tasks = check_int(name, group["num_tasks"], 1)
        if num_tasks % self.group_size and self.group_size % num_tasks:
            raise ValueError(
                f"{name} must be a multiple or a divisor of the process group size "
                f"{self.group_size} with parallel=True, got {num_tasks}"
            )

    def _check_counters(self, group: dict[str, Any], where: str) -> None:
        super()._check_counters(group, where)
        if group["process_group_size"] != self.group_size:
            raise ValueError(
                f"{where}['process_group_size']: saved by Reptile over "
                f"{group['process_group_size']} parallel rank(s), this one runs over "
                f"{self.group_size}"
            )
        per_round = self._per_round(group["num_tasks"])
        if group["trajectory_index"] >= per_round:
            raise ValueError(
                f"{where}['trajectory_index'] is {group['trajectory_index']}: this round "
                f"already ran that many trajectories, more than the {per_round} per round of "
                f"{where}['num_tasks']={group['num_tasks']}; change num_tasks between rounds "
                "(after outer_step())"
            )

    def _check_new_group(self, group: dict[str, Any]) -> None:
        if self.param_groups:
            self._check_one_schedule([self.param_groups[0], group], "param_groups", counters=False)

    def _init_group(self, group: dict[str, Any]) -> None:
        # Counters are one schedule for all groups: a later group joins the current round.
        first = self.param_groups[0]
        for key in self._counters:
            group[key] = 0 if first is group else first[key]
        group["process_group_size"] = self.group_size

    def _checked_groups(self) -> list[dict[str, Any]]:
        groups = super()._checked_groups()
        self._check_one_schedule(groups, "param_groups")
        return groups

    def _check_saved_groups(self, groups: list[dict[str, Any]]) -> None:
        self._check_one_schedule(groups, "state_dict['param_groups']")

    def _check_one_schedule(
        self, groups: list[dict[str, Any]], where: str, counters: bool = True
    ) -> None:
        for key in ("inner_steps", "num_tasks", *(self._counters if counters else ())):
            values = {group[key] for group in groups}
            if len(values) > 1:
                raise ValueError(
                    f"Reptile runs one schedule for all param groups: every {where}[i]"
                    f"[{key!r}] must be equal, got {sorted(values)}"
                )

    # ------------------------------------------------------------------ schedule
    def _per_round(self, num_tasks: int) -> int:
        """Trajectories each rank runs per round."""
        return max(1, num_tasks // self.group_size)

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks (of the first param group; all groups agree)."""
        return int(self.param_groups[0]["num_tasks"])

    @property
    def trajectory_index(self) -> int:
        """Trajectories this rank finished in the current round."""
        return int(self.param_groups[0]["trajectory_index"])

    @property
    def trajectories_per_round(self) -> int:
        return self._per_round(self.num_tasks)

    @property
    def current_task(self) -> int:
        """The task whose batches the next :meth:`~torch_seqreptile.Reptile.step` must see (this rank's, if parallel)."""
        return (self.rank + self.group_size * self.trajectory_index) % self.num_tasks

    # ------------------------------------------------------------------ trajectories
    def _new_state(self, param: Tensor, slow: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        entry = super()._new_state(param, slow, group)
        # Trajectories already finished this round left this parameter at phi.
        entry[ENDPOINT_SUM] = slow * group["trajectory_index"]
        return entry

    def _required_state_keys(self, group: dict[str, Any]) -> set[str]:
        return {SLOW_WEIGHT, ENDPOINT_SUM}

    @torch.no_grad()
    def _add_endpoint(self, groups: list[dict[str, Any]]) -> None:
        for param in self._tracked():
            total = self._own_state[param][ENDPOINT_SUM]
            # blocking copy: a device-to-host copy is complete before it is read
            local_tensor(total).add_(local_tensor(param).to(local_tensor(total).device))
        for group in groups:
            group["trajectory_index"] += 1

    @torch.no_grad()
    def _finish_round(self, groups: list[dict[str, Any]]) -> None:
        count = self._all_reduce_endpoints() if self.parallel else self.trajectory_index
        for group in groups:
            tracked = self._tracked(group["params"])
            sums = [self._own_state[p][ENDPOINT_SUM] for p in tracked]
            if sums:
                torch._foreach_div_([local_tensor(t) for t in sums], float(count))
            self._outer_update(group, targets=sums)
            if sums:
                torch._foreach_zero_([local_tensor(t) for t in sums])
            group["trajectory_index"] = 0

    @torch.no_grad()
    def _all_reduce_endpoints(self) -> int:
        """Sum the end points over the process group; return the number of trajectories.

        A parameter that had no gradient on this rank but had one on another (e.g. the head
        of another rank's task) gets its slow copy now: every trajectory of this rank ended
        at phi for it. Two collectives: one small (flags and counts), one of the end points.
        """
        groups = self.param_groups
        params = list(self.params())
        flags = torch.zeros(len(params) + 1, dtype=torch.int64)
        flags[[i for i, p in enumerate(params) if self._is_tracked(p)]] = 1
        flags[-1] = self.trajectory_index
        device = local_tensor(params[0]).device if params else flags.device
        flags = flags.to(device)
        torch.distributed.all_reduce(flags, group=self.process_group)
        group_of = [g for g in groups for _ in g["params"]]
        for index in flags[:-1].nonzero().flatten().tolist():
            param = params[index]
            if not self._is_tracked(param):
                self._track(param, group_of[index])
        self._untracked = None
        all_reduce_sum_(
            [self._own_state[p][ENDPOINT_SUM] for p in self._tracked(params)],
            self.process_group,
        )
        return int(flags[-1])

    def _after_inner_step(self, groups: list[dict[str, Any]]) -> None:
        if groups[0]["trajectory_step"] < groups[0]["inner_steps"]:
            return
        self._add_endpoint(groups)
        if self.trajectory_index >= self.trajectories_per_round:
            self._finish_round(groups)
        else:
            self._restart_trajectory(groups)

    def outer_step(self) -> None:
        """End the round now: phi moves toward the mean end point of the trajectories so far.

        A trajectory in progress counts as finished. Does nothing if no inner step was
        taken since the last outer update. With ``parallel=True`` it is a collective: every
        rank of the group must call it.
        """
        groups = self._checked_groups()
        if groups[0]["trajectory_step"] > 0:
            self._add_endpoint(groups)
        if self.trajectory_index > 0:
            self._finish_round(groups)
