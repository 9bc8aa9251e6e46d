"""Bad input raises errors that name the argument, and leaves nothing half-updated."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import loss_at, make_model
from torch_seqreptile import Reptile, SeqReptile


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 0.1), {}, ValueError, "inner_steps"),
        ((2.0, 0.1), {}, TypeError, "inner_steps"),
        ((True, 0.1), {}, TypeError, "inner_steps"),
        ((2, -0.1), {}, ValueError, r"outer_lr must be in \[0.0, 1.0\]"),
        ((2, 1.5), {}, ValueError, "outer_lr"),
        ((2, float("nan")), {}, ValueError, "outer_lr"),
        ((2, "0.1"), {}, TypeError, "outer_lr"),
        ((2, 0.1), {"outer_momentum": 1.0}, ValueError, "outer_momentum"),
        ((2, 0.1), {"nesterov": True}, ValueError, "nesterov"),
        ((2, 0.1), {"outer_impl": "cuda_graph"}, ValueError, "outer_impl"),
        ((2, 0.1), {"warmup": 3}, TypeError, "warmup"),
    ],
)
def test_bad_hyperparameters(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SeqReptile(sgd(make_model()), *args, **kwargs)  # type: ignore[arg-type]


def test_wrapped_object_must_be_an_optimizer() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        SeqReptile(list(model.parameters()), 2, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tasks"):
        Reptile(sgd(model), 2, 0.1, num_tasks=0)


def test_state_dict_of_other_parameters_or_wrapper_is_rejected_without_change() -> None:
    model = make_model()
    opt = SeqReptile(sgd(model), 2, 0.1)
    loss_at(model, 0).backward()
    opt.step()
    before = opt.state_dict()
    other = make_model(num_tasks=2)
    other_opt = SeqReptile(sgd(other), 2, 0.1)
    with pytest.raises(ValueError, match=r"must list 11 parameters, got 9"):
        opt.load_state_dict(other_opt.state_dict())
    reptile = Reptile(sgd(make_model()), 2, 0.1, num_tasks=3)
    with pytest.raises(ValueError, match="saved by another meta-optimizer"):
        opt.load_state_dict(reptile.state_dict())
    with pytest.raises(ValueError, match="not a state_dict of SeqReptile"):
        opt.load_state_dict(sgd(make_model()).state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for index, entry in before["state"].items():
        assert torch.equal(entry["slow_weight"], after["state"][index]["slow_weight"])


def test_reject_nonfinite_refuses_the_step_and_changes_nothing() -> None:
    model = make_model()
    opt = SeqReptile(torch.optim.Adam(model.parameters(), lr=0.1), 1, 0.5, reject_nonfinite=True)
    loss_at(model, 0).backward()
    model.trunk[0].weight.grad[0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not finite"):
        opt.step()
    assert opt.trajectory_step == 0 and len(opt.state) == 0 and len(opt.optimizer.state) == 0
    torch.testing.assert_close(model.state_dict(), weights, rtol=0, atol=0)
