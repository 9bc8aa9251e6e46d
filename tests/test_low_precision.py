"""bf16 / fp16 parameters: float32 slow weights keep every outer update that float32 keeps.

The outer step eta * (theta_K - phi) is often far below half a bf16 ulp of phi (e.g. eta 0.1
times a few inner steps of lr 1e-4); stored in bf16, phi would round back to itself. With the
default float32 phi (``slow_dtype=None``) the result must not depend on the parameters'
dtype at all: given the same trajectory end points, phi is bit for bit that of a float32
model, and theta is phi rounded to the parameter dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from torch_seqreptile import Reptile, SeqReptile

LOW = [torch.bfloat16, torch.float16]


class SetTo(torch.optim.Optimizer):
    """An inner optimizer whose step writes ``p.grad`` into ``p`` (the trajectory's end point
    is whatever the test says), so that the outer update is tested on its own."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(p.grad)


def run(
    dtype: torch.dtype, start: Tensor, ends: list[Tensor], *, reptile: bool, **kwargs
) -> Tensor:
    """phi after one outer update per end point, for a parameter of ``dtype``."""
    param = torch.nn.Parameter(start.to(dtype))
    opt: SeqReptile | Reptile
    if reptile:
        opt = Reptile(SetTo([param]), 1, 0.1, num_tasks=1, **kwargs)
    else:
        opt = SeqReptile(SetTo([param]), 1, 0.1, outer_momentum=0.5, **kwargs)
    for end in ends:
        param.grad = end.to(dtype)
        opt.step()
        slow = opt.state[param]["slow_weight"]
        assert torch.equal(param.detach(), slow.to(dtype)), "theta is phi rounded"
    return opt.state[param]["slow_weight"]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(LOW),
    reptile=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.integers(-20, 10),
    log_step=st.integers(-30, -1),
)
def test_phi_does_not_depend_on_the_parameter_dtype(
    dtype: torch.dtype, reptile: bool, seed: int, log_scale: int, log_step: int
) -> None:
    """Over scales 2^-20..2^10 and relative steps 2^-30..2^-1: same end points, same phi."""
    generator = torch.Generator().manual_seed(seed)
    scale, step = 2.0**log_scale, 2.0**log_step
    start = (torch.randn(64, generator=generator) * scale).to(dtype).float()
    ends = [
        (start * (1 + step * torch.randn(64, generator=generator))).to(dtype).float()
        for _ in range(4)
    ]
    low = run(dtype, start, ends, reptile=reptile)
    full = run(torch.float32, start, ends, reptile=reptile)
    assert low.dtype == torch.float32
    assert torch.equal(low, full)


@pytest.mark.parametrize("dtype", LOW)
def test_an_update_below_half_an_ulp_is_kept(dtype: torch.dtype) -> None:
    """phi = 300 (ulp 2 in bf16, 0.25 in fp16): every trajectory ends one ulp above theta_0,
    so eta = 0.1 moves phi by at most 0.1 ulp a time. In float32 phi climbs by 0.9 ulp
    in 10 outer updates, as a float64 model of it does; stored in the parameter's dtype it
    never moves."""
    ulp = float(torch.finfo(dtype).eps) * 256  # spacing of [256, 512)
    start = torch.full((4,), 300.0)

    def climb(**kwargs: object) -> Tensor:
        param = torch.nn.Parameter(start.to(dtype))
        opt = SeqReptile(SetTo([param]), 1, 0.1, **kwargs)  # type: ignore[arg-type]
        for _ in range(10):
            param.grad = (param.detach().float() + ulp).to(dtype)
            opt.step()
        return opt.state[param]["slow_weight"].float()

    reference = start.double()  # phi <- phi + eta (round(phi) + ulp - phi), in float64
    for _ in range(10):
        reference = reference + 0.1 * (reference.to(dtype).double() + ulp - reference)
    kept, lost = climb(), climb(slow_dtype=dtype)
    assert torch.equal(lost, start), "a bf16/fp16 phi rounds every sub-ulp step away"
    torch.testing.assert_close(kept.double(), reference, rtol=1e-6, atol=0)
    assert bool((kept > start + 0.9 * ulp).all()), kept
    assert climb(slow_dtype=torch.float32).equal(kept)


def test_state_dict_round_trip_keeps_float32_phi() -> None:
    param = torch.nn.Parameter(torch.randn(5).bfloat16())
    opt = SeqReptile(torch.optim.SGD([param], lr=1e-3), 3, 0.1)
    param.grad = torch.randn(5).bfloat16()
    opt.step()
    fresh = SeqReptile(torch.optim.SGD([param], lr=1e-3), 3, 0.1)
    state = opt.state_dict()
    state["state"][0]["slow_weight"] = state["state"][0]["slow_weight"].double()
    fresh.load_state_dict(state)
    assert fresh.state[param]["slow_weight"].dtype == torch.float32
    assert torch.equal(fresh.state[param]["slow_weight"], opt.state[param]["slow_weight"])


def test_tiny_bf16_bert_loses_no_outer_update_with_float32_phi(tmp_path) -> None:
    pytest.importorskip("transformers")
    from benchmarks.low_precision import main

    rows = main(["--updates", "2", "--out", str(tmp_path / "lp.json")])["rows"]
    bf16, fp32 = rows["bf16 phi (slow_dtype=bfloat16)"], rows["float32 phi (default)"]  # type: ignore[index]
    assert fp32["lost_elements"] == 0 and fp32["changed_elements"] > 0
    assert bf16["lost_fraction"] > 0.2  # the 0.1 behaviour: about half of the changes lost
    assert fp32["slow_weight_bytes"] == 2 * fp32["param_bytes"]
