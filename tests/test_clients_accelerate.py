"""SeqReptile prepared by a real ``accelerate.Accelerator``: ``save_state``/``load_state``.

``prepare`` wraps the optimizer in an ``AcceleratedOptimizer`` (which reloads its state dict
at once, for device placement) and the loader in a ``DataLoaderShard``. A run interrupted
inside a trajectory, saved, and resumed with fresh objects and a fresh ``Accelerator`` must
end exactly where the uninterrupted run ends: weights, slow weights and outer momentum.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("accelerate")

from accelerate import Accelerator

from torch_seqreptile import SeqReptile

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = 11  # outer updates (K = 3) after steps 3, 6 and 9; two steps of a fourth trajectory
STOP = 4  # the state is saved one step into the second trajectory
BATCH = 4


def make() -> tuple[nn.Module, SeqReptile, DataLoader[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    inner = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    opt = SeqReptile(inner, inner_steps=3, outer_lr=0.5, outer_momentum=0.5, nesterov=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(BATCHES * BATCH, generator=generator, dtype=torch.float64)
    return model, opt, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def prepared() -> tuple[Accelerator, nn.Module, Any, Any]:
    accelerator = Accelerator(cpu=True)
    model, opt, loader = accelerator.prepare(*make())
    return accelerator, model, opt, loader


def train(accelerator: Accelerator, model: nn.Module, opt: Any, batches: Any) -> int:
    steps = 0
    for x, y in batches:
        opt.zero_grad()
        accelerator.backward((model(x).squeeze(-1) - y).pow(2).mean())
        opt.step()
        steps += 1
    return steps


def snapshot(model: nn.Module, opt: Any) -> list[Tensor]:
    """theta, phi and the outer momentum buffers (``opt.state`` reads the wrapper's state)."""
    params = list(model.parameters())
    return [
        *(p.detach().clone() for p in params),
        *(opt.state[p]["slow_weight"].clone() for p in params),
        *(opt.state[p]["outer_momentum_buffer"].clone() for p in params),
    ]


def test_save_state_load_state_resumes_exactly(tmp_path: Path) -> None:
    accelerator, model, opt, loader = prepared()
    assert isinstance(opt.optimizer, SeqReptile)
    assert train(accelerator, model, opt, loader) == BATCHES
    assert opt.optimizer.trajectory_step == BATCHES % 3
    uninterrupted = snapshot(model, opt)

    accelerator, model, opt, loader = prepared()
    assert train(accelerator, model, opt, itertools.islice(loader, STOP)) == STOP
    saved_snapshot = snapshot(model, opt)
    saved_state = opt.state_dict()
    accelerator.save_state(tmp_path / "state")
    on_disk = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert on_disk["param_groups"][0]["trajectory_step"] == STOP % 3
    assert all("slow_weight" in entry for entry in on_disk["state"].values())
    params = saved_snapshot[:4]
    assert any(not torch.equal(p, s) for p, s in zip(params, saved_snapshot[4:8]))  # phi != theta

    accelerator, model, opt, loader = prepared()
    accelerator.load_state(tmp_path / "state")
    assert opt.optimizer.trajectory_step == STOP % 3
    for a, b in zip(snapshot(model, opt), saved_snapshot, strict=True):
        assert torch.equal(a, b)
    loaded_state = opt.state_dict()
    for index, entry in saved_state["state"].items():
        assert loaded_state["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(loaded_state["state"][index][key], value), (index, key)

    rest = accelerator.skip_first_batches(loader, STOP)
    assert train(accelerator, model, opt, rest) == BATCHES - STOP
    for a, b in zip(snapshot(model, opt), uninterrupted, strict=True):
        assert torch.equal(a, b)
