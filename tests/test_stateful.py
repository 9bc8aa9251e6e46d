"""Stateful property test: SeqReptile and Reptile against a float64 model of the paper.

A Hypothesis ``RuleBasedStateMachine`` drives the optimizer through random sequences of
``step``, ``step(closure)``, ``outer_step``, ``add_param_group``, ``slow_weights()``, changes
of ``outer_lr`` / ``inner_steps``, and state-dict round trips into a fresh optimizer (also
through ``torch.save``/``torch.load(weights_only=True)``, ``copy.deepcopy`` and ``pickle``).
After every operation the parameters and slow weights must equal those of a plain reference
implementation of Algorithm 1 (SeqReptile) and Eq. 2-3 (Reptile), which keeps phi, the outer
momentum buffers and the trajectory end points in Python lists and steps its own copy of the
inner optimizer (SGD with momentum) on its own copy of the parameters.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor

from torch_seqreptile import Reptile, SeqReptile

NUM_TASKS = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}


def initial_params() -> list[Tensor]:
    """W (shared) and one head per task; a head gets a gradient only from its own task."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 3), (3,), (3,), (3,)]
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]


def loss_of(params: list[Tensor], batch: int, task: int) -> Tensor:
    generator = torch.Generator().manual_seed(100 + batch)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(4, generator=generator, dtype=torch.float64)
    return ((x @ params[0]).tanh() @ params[1 + task] - y - task).pow(2).mean()


class Reference:
    """Algorithm 1 / Eq. 2-3 with explicit phi, momentum buffers and end-point sums."""

    def __init__(self, reptile: bool, groups: list[dict[str, Any]]) -> None:
        self.reptile = reptile
        self.params = [p.clone().requires_grad_() for p in initial_params()]
        self.phi = [p.detach().clone() for p in self.params]
        self.buffers = [torch.zeros_like(p) for p in self.phi]
        self.sums = [torch.zeros_like(p) for p in self.phi]
        self.groups: list[dict[str, Any]] = []
        self.inner: torch.optim.SGD | None = None
        self.trajectory_index = 0
        for group in groups:
            self.add_group(group)

    def add_group(self, group: dict[str, Any]) -> None:
        indices = group["indices"]
        params = [self.params[i] for i in indices]
        if self.inner is None:
            self.inner = torch.optim.SGD(params, lr=0.1, momentum=0.5)
        else:
            self.inner.add_param_group({"params": params})
        if self.reptile and self.groups:  # trajectories finished this round ended at phi
            for i in indices:
                self.sums[i] = self.phi[i] * self.trajectory_index
        # SeqReptile: a new group starts its own trajectory; Reptile: it joins the round
        self.groups.append({**group, "count": self.count if self.reptile and self.groups else 0})

    @property
    def count(self) -> int:
        return int(self.groups[0]["count"])

    @property
    def current_task(self) -> int:
        return self.trajectory_index % NUM_TASKS

    def step(self, batch: int, task: int) -> None:
        assert self.inner is not None
        self.inner.zero_grad()
        for p in self.params:
            p.grad = None
        loss_of(self.params, batch, task).backward()
        self.inner.step()
        for group in self.groups:
            group["count"] += 1
        if self.reptile:
            if self.count >= self.groups[0]["inner_steps"]:
                self.end_trajectory()
        else:
            for group in self.groups:
                if group["count"] >= group["inner_steps"]:
                    self.outer_update(group, [self.params[i].detach() for i in range(4)])

    @torch.no_grad()
    def outer_update(self, group: dict[str, Any], targets: list[Tensor]) -> None:
        """Eq. 6 (phi <- phi - eta MG) with the documented heavy-ball / Nesterov option."""
        m, eta = group["outer_momentum"], group["outer_lr"]
        for i in group["indices"]:
            meta_gradient = self.phi[i] - targets[i]
            direction = meta_gradient
            if m > 0:
                self.buffers[i] = m * self.buffers[i] + meta_gradient
                direction = (
                    meta_gradient + m * self.buffers[i] if group["nesterov"] else self.buffers[i]
                )
            self.phi[i] = self.phi[i] - eta * direction
            self.params[i].copy_(self.phi[i])
        group["count"] = 0

    @torch.no_grad()
    def end_trajectory(self) -> None:
        for i in range(4):
            self.sums[i] += self.params[i].detach()
        self.trajectory_index += 1
        if self.trajectory_index == NUM_TASKS:
            self.finish_round()
        else:
            for i in range(4):
                self.params[i].copy_(self.phi[i])
            for group in self.groups:
                group["count"] = 0

    def finish_round(self) -> None:
        means = [s / self.trajectory_index for s in self.sums]
        for group in self.groups:
            self.outer_update(group, means)
        self.sums = [torch.zeros_like(p) for p in self.phi]
        self.trajectory_index = 0

    def outer_step(self) -> None:
        if self.reptile:
            if self.count > 0:
                with torch.no_grad():
                    for i in range(4):
                        self.sums[i] += self.params[i].detach()
                self.trajectory_index += 1
            if self.trajectory_index > 0:
                self.finish_round()
        else:
            for group in self.groups:
                if group["count"] > 0:
                    self.outer_update(group, [self.params[i].detach() for i in range(4)])


GROUP = st.fixed_dictionaries(
    {
        "inner_steps": st.integers(1, 4),
        "outer_lr": st.sampled_from([0.0, 0.3, 1.0, 0.71]),
        "outer_momentum": st.sampled_from([0.0, 0.5]),
        "nesterov": st.booleans(),
    }
)


class MetaOptimizerMachine(RuleBasedStateMachine):
    @initialize(reptile=st.booleans(), first=GROUP, second=GROUP)
    def build(self, reptile: bool, first: dict[str, Any], second: dict[str, Any]) -> None:
        if reptile:  # one schedule: the groups share K
            second = {**second, "inner_steps": first["inner_steps"]}
        groups = [
            {**g, "nesterov": g["nesterov"] and g["outer_momentum"] > 0} for g in (first, second)
        ]
        groups[0]["indices"], groups[1]["indices"] = [0], [1, 2]
        self.reptile = reptile
        self.reference = Reference(reptile, groups)
        self.params = [p.clone().requires_grad_() for p in initial_params()]
        self.group_specs = groups
        self.opt = self.make_optimizer(groups)
        self.batch = 0

    def make_optimizer(self, groups: list[dict[str, Any]]) -> SeqReptile | Reptile:
        def spec(g: dict[str, Any]) -> dict[str, Any]:
            return {
                "params": [self.params[i] for i in g["indices"]],
                "inner_steps": g["inner_steps"],
                "outer_lr": g["outer_lr"],
                "outer_momentum": g["outer_momentum"],
                "outer_nesterov": g["nesterov"],
            }

        inner = torch.optim.SGD([spec(groups[0])], lr=0.1, momentum=0.5)
        first = groups[0]
        args = (first["inner_steps"], first["outer_lr"])
        kwargs = {"outer_momentum": first["outer_momentum"], "nesterov": first["nesterov"]}
        opt: SeqReptile | Reptile
        if self.reptile:
            opt = Reptile(inner, *args, num_tasks=NUM_TASKS, **kwargs)
        else:
            opt = SeqReptile(inner, *args, **kwargs)
        for g in groups[1:]:
            opt.add_param_group(spec(g))
        return opt

    # ------------------------------------------------------------------ operations
    def next_task(self, drawn: int) -> int:
        if self.reptile:
            assert isinstance(self.opt, Reptile)
            assert self.opt.current_task == self.reference.current_task
            return self.opt.current_task
        return drawn

    @rule(drawn=st.integers(0, NUM_TASKS - 1))
    def step(self, drawn: int) -> None:
        task = self.next_task(drawn)
        for p in self.params:
            p.grad = None
        loss_of(self.params, self.batch, task).backward()
        self.opt.step()
        self.reference.step(self.batch, task)
        self.batch += 1

    @rule(drawn=st.integers(0, NUM_TASKS - 1))
    def step_with_closure(self, drawn: int) -> None:
        task = self.next_task(drawn)

        def closure() -> Tensor:
            for p in self.params:
                p.grad = None
            loss = loss_of(self.params, self.batch, task)
            loss.backward()
            return loss

        self.opt.step(closure)
        self.reference.step(self.batch, task)
        self.batch += 1

    @rule()
    def outer_step(self) -> None:
        self.opt.outer_step()
        self.reference.outer_step()

    @precondition(lambda self: len(self.group_specs) == 2)
    @rule(group=GROUP)
    def add_param_group(self, group: dict[str, Any]) -> None:
        group = {
            **group,
            "indices": [3],
            "nesterov": group["nesterov"] and group["outer_momentum"] > 0,
        }
        if self.reptile:
            group["inner_steps"] = self.opt.param_groups[0]["inner_steps"]
        self.group_specs.append(group)
        self.opt.add_param_group(
            {
                "params": [self.params[3]],
                "inner_steps": group["inner_steps"],
                "outer_lr": group["outer_lr"],
                "outer_momentum": group["outer_momentum"],
                "outer_nesterov": group["nesterov"],
            }
        )
        self.reference.add_group(group)

    @rule(index=st.integers(0, 2), outer_lr=st.sampled_from([0.0, 0.25, 0.9, 1.0]))
    def change_outer_lr(self, index: int, outer_lr: float) -> None:
        if index < len(self.opt.param_groups):
            self.opt.param_groups[index]["outer_lr"] = outer_lr
            self.reference.groups[index]["outer_lr"] = outer_lr

    @rule(index=st.integers(0, 2), inner_steps=st.integers(1, 4))
    def change_inner_steps(self, index: int, inner_steps: int) -> None:
        indices = range(len(self.opt.param_groups)) if self.reptile else [index]
        for i in indices:
            if i < len(self.opt.param_groups):
                self.opt.param_groups[i]["inner_steps"] = inner_steps
                self.reference.groups[i]["inner_steps"] = inner_steps

    @rule()
    def evaluate_slow_weights(self) -> None:
        with self.opt.slow_weights():
            for p, phi in zip(self.params, self.reference.phi):
                torch.testing.assert_close(p.detach(), phi, **TOL)

    @rule(how=st.sampled_from(["state_dict", "torch.save", "deepcopy", "pickle"]))
    def reload(self, how: str) -> None:
        if how == "deepcopy":
            self.params, self.opt = copy.deepcopy((self.params, self.opt))
            return
        if how == "pickle":
            self.params, self.opt = pickle.loads(pickle.dumps((self.params, self.opt)))
            return
        state = self.opt.state_dict()
        if how == "torch.save":
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
        fresh = self.make_optimizer(
            [{**g, "outer_lr": 0.5, "inner_steps": 7} for g in self.group_specs]
        )
        fresh.load_state_dict(state)
        self.opt = fresh

    # ------------------------------------------------------------------ invariants
    @invariant()
    def matches_reference(self) -> None:
        if not hasattr(self, "opt"):
            return
        for p, theta in zip(self.params, self.reference.params):
            torch.testing.assert_close(p.detach(), theta.detach(), **TOL)
        for p, phi in zip(self.params, self.reference.phi):
            slow = self.opt.state.get(p, {}).get("slow_weight", p.detach())
            torch.testing.assert_close(slow, phi, **TOL)
        for group, ref in zip(self.opt.param_groups, self.reference.groups):
            assert group["trajectory_step"] == ref["count"]


MetaOptimizerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestMetaOptimizerMachine = MetaOptimizerMachine.TestCase
