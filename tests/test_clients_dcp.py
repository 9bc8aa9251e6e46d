"""SeqReptile and Reptile through ``torch.distributed.checkpoint``: the state-dict helpers
(nested and flattened), ``dcp.save``/``dcp.load`` and FSDP2 on two gloo ranks.

A fresh optimizer is stepped once by DCP (``_init_optim_state``: zero gradients, lr 0)
before its state is read or loaded; the resumed runs must still continue bit-exactly.
The FSDP2 part runs this file as ``python -m tests.test_clients_dcp OUT`` on two ranks.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torch_seqreptile import Reptile, SeqReptile

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

ROOT = Path(__file__).resolve().parents[1]
STOP, STEPS = 5, 12  # the checkpoint is inside a trajectory; outer updates follow it
OPTIMIZERS: dict[str, Callable[[nn.Module], SeqReptile | Reptile]] = {
    "seqreptile": lambda m: SeqReptile(
        torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1), 3, 0.5, outer_momentum=0.5
    ),
    "reptile": lambda m: Reptile(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 2, 0.5, 3),
}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def setup(name: str) -> tuple[nn.Module, SeqReptile | Reptile]:
    model = make_model()
    return model, OPTIMIZERS[name](model)


def train(model: nn.Module, opt: Any, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(500 + step)
        x = torch.randn(8, 4, generator=generator, dtype=torch.float64)[rank::world]
        y = (torch.randn(8, generator=generator, dtype=torch.float64) + step % 3)[rank::world]
        opt.zero_grad()
        (model(x).squeeze(-1) - y).pow(2).mean().backward()
        opt.step()


def full(tensor: Tensor) -> Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def snapshot(model: nn.Module, opt: SeqReptile | Reptile) -> list[Tensor]:
    """theta, then every entry of the wrapper's own state (phi, ...), as full tensors."""
    params = list(model.parameters())
    return [full(p) for p in params] + [
        full(opt.state[p][key]) for p in params for key in sorted(opt.state[p])
    ]


def assert_same(got: Any, expected: Any, where: str = "state_dict") -> None:
    if isinstance(expected, Tensor):
        assert isinstance(got, Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got, key=str) == sorted(expected, key=str), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert got == expected, where


@pytest.mark.parametrize("via_files", [False, True], ids=["in_memory", "dcp_save_load"])
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_resumes_exactly(
    name: str, flatten: bool, via_files: bool, tmp_path: Path
) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = setup(name)
    train(model, opt, range(STOP))
    expected = copy.deepcopy(opt.state_dict())
    osd = get_optimizer_state_dict(model, opt, options=options)
    if via_files:
        dcp_save({"model": model.state_dict(), "optim": osd}, checkpoint_id=tmp_path)

    resumed, resumed_opt = setup(name)
    steps: list[int] = []
    resumed_opt.register_step_post_hook(lambda *args: steps.append(resumed_opt.trajectory_step))
    if via_files:  # the template's optimizer state comes from DCP's zero-grad step
        loaded: dict[str, Any] = {"model": resumed.state_dict()}
        loaded["optim"] = get_optimizer_state_dict(resumed, resumed_opt, options=options)
        dcp_load(loaded, checkpoint_id=tmp_path)
        osd = loaded["optim"]
    else:
        resumed.load_state_dict(model.state_dict())
        osd = copy.deepcopy(osd)  # torch optimizers load tensors without copying them
    set_optimizer_state_dict(resumed, resumed_opt, osd, options=options)
    assert steps == [1]  # DCP stepped the fresh optimizer once, counting an inner step...
    assert_same(resumed_opt.state_dict(), expected)  # ...which the loaded state replaced

    train(model, opt, range(STOP, STEPS))
    train(resumed, resumed_opt, range(STOP, STEPS))
    for a, b in zip(snapshot(resumed, resumed_opt), snapshot(model, opt), strict=True):
        assert torch.equal(a, b)
    assert_same(resumed_opt.state_dict(), opt.state_dict())


# ---------------------------------------------------------------- FSDP2 on two gloo ranks
def fsdp_setup() -> tuple[nn.Module, SeqReptile | Reptile]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    return model, OPTIMIZERS["seqreptile"](model)


def fsdp_worker(out: Path) -> None:
    """Uninterrupted run; run to STOP, dcp.save; fresh copy, dcp.load, finish; again from
    full state dicts broadcast from rank 0."""
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, opt = fsdp_setup()
    train(model, opt, range(STEPS), rank, world)
    uninterrupted = snapshot(model, opt)

    model, opt = fsdp_setup()
    train(model, opt, range(STOP), rank, world)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    state["optim"] = get_optimizer_state_dict(model, opt)
    dcp_save(state, checkpoint_id=out / "checkpoint")
    resumed, resumed_opt = fsdp_setup()
    loaded: dict[str, Any] = {"model": get_model_state_dict(resumed)}
    loaded["optim"] = get_optimizer_state_dict(resumed, resumed_opt)
    dcp_load(loaded, checkpoint_id=out / "checkpoint")
    set_model_state_dict(resumed, loaded["model"])
    set_optimizer_state_dict(resumed, resumed_opt, loaded["optim"])
    loaded_step = resumed_opt.trajectory_step
    train(resumed, resumed_opt, range(STOP, STEPS), rank, world)

    # full state dicts on rank 0 only, broadcast and resharded on loading
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    state = {"model": get_model_state_dict(model, options=options)}
    state["optim"] = get_optimizer_state_dict(model, opt, options=options)
    again, again_opt = fsdp_setup()
    set_model_state_dict(again, state["model"] if rank == 0 else {}, options=options)
    set_optimizer_state_dict(again, again_opt, state["optim"] if rank == 0 else {}, options=options)
    train(again, again_opt, range(STOP, STEPS), rank, world)
    result = {
        "uninterrupted": uninterrupted,
        "resumed": snapshot(resumed, resumed_opt),
        "broadcast": snapshot(again, again_opt),
        "loaded_trajectory_step": loaded_step,
        "sharded": [isinstance(resumed_opt.state[p]["slow_weight"], DTensor) for p in resumed.parameters()],
    }  # fmt: skip
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_fsdp2_dcp_save_load_resumes_exactly(tmp_path: Path) -> None:
    loopback = next((n for _, n in socket.if_nameindex() if n.startswith("lo")), "lo")
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": loopback, "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    command = [sys.executable, "-m", "tests.test_clients_dcp", str(tmp_path)]
    procs = [
        subprocess.Popen(
            command, cwd=ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(logs)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert result["sharded"] == [True] * 4  # phi is sharded like its parameter
        assert result["loaded_trajectory_step"] == STOP % 3
        for key in ("resumed", "broadcast"):
            for a, b in zip(result[key], result["uninterrupted"], strict=True):
                assert torch.equal(a, b), key
    for a, b in zip(ranks[0]["resumed"], ranks[1]["resumed"], strict=True):
        assert torch.equal(a, b)
    model, opt = setup("seqreptile")  # one process on the whole batches: equal to rounding
    train(model, opt, range(STEPS))
    for a, b in zip(ranks[0]["resumed"], snapshot(model, opt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


if __name__ == "__main__":
    fsdp_worker(Path(sys.argv[1]))
