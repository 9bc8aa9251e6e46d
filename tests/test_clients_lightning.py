"""SeqReptile and Reptile trained by a real ``lightning.Trainer`` (automatic optimization).

Lightning calls ``optimizer.step(closure)`` through its ``LightningOptimizer`` and saves
``optimizer.state_dict()`` in its checkpoints. The batches come from a one-task-per-batch
sampler seeded by the global batch number, with ``set_epoch`` (which Lightning calls before
every epoch, from its restored epoch counter on resume): a resumed run sees exactly the
batches of an uninterrupted one. ``TaskBatchSampler`` keeps its position in a stream instead
(it does not take ``set_epoch`` yet), so the resume tests use this sampler; the last test
checks that ``TaskBatchSampler`` gives full epochs under Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

pytest.importorskip("lightning")

import lightning as L

from torch_seqreptile import Reptile, SeqReptile, TaskBatchSampler

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # the resumed runs' own dirs
]

SIZES = [12, 16, 10]
OFFSETS = [0, 12, 28]
BATCH = 4
BATCHES = 8  # per epoch: epoch ends fall inside trajectories (K = 3) and Reptile rounds
EPOCHS = 3
MakeOptimizer = Callable[[Iterable[nn.Parameter]], SeqReptile | Reptile]
OPTIMIZERS: dict[str, tuple[MakeOptimizer, int]] = {  # factory, steps per task (0: random)
    "seqreptile": (lambda ps: SeqReptile(torch.optim.AdamW(ps, lr=0.02), 3, 0.5), 0),
    "reptile": (lambda ps: Reptile(torch.optim.SGD(ps, lr=0.05, momentum=0.9), 2, 0.5, 3), 2),
}


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    task = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    x = torch.randn(sum(SIZES), 4, generator=generator)
    return TensorDataset(x, task, torch.randn(sum(SIZES), generator=generator) + task)


class StepSeededTaskSampler(Sampler[int]):
    """Batch number s: ``BATCH`` examples of one task, drawn from seed s (cyclic tasks if
    asked). Lightning calls ``set_epoch`` of a ``DataLoader``'s ``sampler``."""

    def __init__(self, steps_per_task: int) -> None:
        self.steps_per_task = steps_per_task
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return BATCHES * BATCH

    def __iter__(self) -> Iterator[int]:
        for step in range(self.epoch * BATCHES, (self.epoch + 1) * BATCHES):
            generator = torch.Generator().manual_seed(1000 + step)
            task = int(torch.randint(len(SIZES), (1,), generator=generator))
            if self.steps_per_task:
                task = step // self.steps_per_task % len(SIZES)
            rows = torch.randperm(SIZES[task], generator=generator)[:BATCH] + OFFSETS[task]
            yield from rows.tolist()


def loader(steps_per_task: int) -> DataLoader[Any]:
    return DataLoader(dataset(), batch_size=BATCH, sampler=StepSeededTaskSampler(steps_per_task))


class TaskNet(L.LightningModule):
    """A shared trunk and one output per task; records what every optimizer step did."""

    def __init__(self, make_optimizer: MakeOptimizer) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, len(SIZES)))
        self.make_optimizer = make_optimizer
        self.tasks: list[tuple[int, int]] = []  # (task of the batch, opt.current_task)
        self.steps: list[tuple[int, bool, bool]] = []  # trajectory_step, theta == phi, phi moved
        self.phi = [p.detach().clone() for p in self.parameters()]

    def loss(self, batch: list[Tensor]) -> Tensor:
        x, task, y = batch
        out: Tensor = self.net(x)
        return (out.gather(1, task[:, None]).squeeze(1) - y).pow(2).mean()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        opt = self.trainer.optimizers[0]
        self.tasks.append((int(batch[1][0]), getattr(opt, "current_task", -1)))
        return self.loss(batch)

    def configure_optimizers(self) -> SeqReptile | Reptile:
        opt = self.make_optimizer(self.parameters())
        opt.register_step_post_hook(lambda o, args, kwargs: self.record(opt))
        return opt

    def record(self, opt: SeqReptile | Reptile) -> None:
        params = list(self.parameters())
        phi = [opt.state[p]["slow_weight"].clone() for p in params]
        same = all(torch.equal(p, s) for p, s in zip(params, phi))
        moved = any(not torch.equal(a, b) for a, b in zip(phi, self.phi))
        self.steps.append((opt.trajectory_step, same, moved))
        self.phi = phi


class Snapshots(L.Callback):
    """theta, the wrapper's state (phi, ...) and group 0's values at every epoch's end."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        params = list(pl_module.parameters())
        self.epochs.append({
            "theta": [p.detach().clone() for p in params],
            "phi": [opt.state[p]["slow_weight"].clone() for p in params],
            "own": [opt.state[p][k].clone() for p in params for k in sorted(opt.state[p])],
            "group": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
        })  # fmt: skip


def fit(
    name: str, epochs: int, root: Path, callbacks: list[L.Callback], ckpt_path: str | None = None
) -> tuple[TaskNet, L.Trainer]:
    make, steps_per_task = OPTIMIZERS[name]
    module = TaskNet(make)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, loader(steps_per_task), ckpt_path=ckpt_path)
    return module, trainer


def equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trainer_steps_and_equals_hand_written_loop(name: str, tmp_path: Path) -> None:
    module, trainer = fit(name, EPOCHS, tmp_path, [])
    steps = EPOCHS * BATCHES
    assert trainer.global_step == len(module.steps) == steps  # one wrapper step per batch
    k = 3 if name == "seqreptile" else 2
    per_outer = 3 if name == "seqreptile" else 2 * 3  # K, or K * T for a Reptile round
    expected = [(i % k, i % k == 0, i % per_outer == 0) for i in range(1, steps + 1)]
    assert module.steps == expected  # theta <- phi after each trajectory; phi moves on schedule
    if name == "reptile":
        assert all(task == current for task, current in module.tasks)

    make, steps_per_task = OPTIMIZERS[name]
    reference = TaskNet(make)
    opt = make(reference.parameters())
    batches = loader(steps_per_task)
    for epoch in range(EPOCHS):
        batches.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for batch in batches:
            opt.zero_grad()
            reference.loss(batch).backward()
            opt.step()
    lightning_opt = trainer.optimizers[0]
    assert isinstance(lightning_opt, type(opt))
    params, ref_params = list(lightning_opt.params()), list(opt.params())
    assert equal([p.detach() for p in params], [p.detach() for p in ref_params])
    phi = [lightning_opt.state[p]["slow_weight"] for p in params]
    assert equal(phi, [opt.state[p]["slow_weight"] for p in ref_params])
    assert not equal(phi, [p.detach() for p in TaskNet(make).parameters()])  # it trained


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_checkpoint_equals_uninterrupted_run(name: str, tmp_path: Path) -> None:
    full = Snapshots()
    fit(name, EPOCHS, tmp_path / "full", [full])

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(name, 1, tmp_path / "first", [checkpoint])
    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    optimizer_state = saved["optimizer_states"][0]
    group = optimizer_state["param_groups"][0]
    if name == "seqreptile":  # inside a trajectory: phi != theta
        assert group["trajectory_step"] == BATCHES % 3
        assert not equal(full.epochs[0]["theta"], full.epochs[0]["phi"])
    else:  # inside a round: one trajectory's end point summed
        assert (group["trajectory_step"], group["trajectory_index"]) == (0, BATCHES // 2 % 3)
    assert all("slow_weight" in entry for entry in optimizer_state["state"].values())

    resumed = Snapshots()
    fit(name, EPOCHS, tmp_path / "resumed", [resumed], ckpt_path=checkpoint.last_model_path)
    assert len(resumed.epochs) == EPOCHS - 1
    for got, expected in zip(resumed.epochs, full.epochs[1:]):
        assert got["group"] == expected["group"]  # trajectory_step, ...
        for key in ("theta", "own"):  # own: phi, Reptile's end-point sums
            assert equal(got[key], expected[key]), key

    # Control: the same resume without the wrapper's per-parameter state ends elsewhere.
    for entry in optimizer_state["state"].values():
        for key in ("slow_weight", "endpoint_sum", "outer_momentum_buffer"):
            entry.pop(key, None)
    torch.save(saved, tmp_path / "no_slow.ckpt")
    lost = Snapshots()
    fit(name, EPOCHS, tmp_path / "lost", [lost], ckpt_path=str(tmp_path / "no_slow.ckpt"))
    assert not equal(lost.epochs[0]["phi"], full.epochs[1]["phi"])


def test_task_batch_sampler_gives_full_epochs_under_lightning(tmp_path: Path) -> None:
    """Lightning stops after ``len(loader)`` batches: every epoch must still be full."""
    module = TaskNet(OPTIMIZERS["seqreptile"][0])
    sampler = TaskBatchSampler(SIZES, BATCH, seed=3, num_batches=BATCHES)
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(dataset(), batch_sampler=sampler))
    assert trainer.global_step == len(module.steps) == EPOCHS * BATCHES
    expected = TaskBatchSampler(SIZES, BATCH, seed=3, num_batches=BATCHES)
    tasks = [sampler.task_of(b[0]) for _ in range(EPOCHS) for b in expected]
    assert [task for task, _ in module.tasks] == tasks


def test_mid_epoch_resume_with_stateful_dataloader_and_workers(tmp_path: Path) -> None:
    """Lightning saves a ``StatefulDataLoader``'s state in its checkpoints: with
    ``TaskBatchSampler`` and worker processes a run resumed mid-epoch ends where the
    uninterrupted run does, weights and slow weights bit for bit."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader_() -> Any:
        sampler = TaskBatchSampler(SIZES, BATCH, seed=3, num_batches=BATCHES)
        return stateful.StatefulDataLoader(dataset(), batch_sampler=sampler, num_workers=2)

    def run(root: Path, max_steps: int, ckpt_path: str | None = None, **kw: Any) -> TaskNet:
        module = TaskNet(OPTIMIZERS["seqreptile"][0])
        trainer = L.Trainer(
            max_epochs=EPOCHS, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kw,
        )  # fmt: skip
        trainer.fit(module, loader_(), ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full", -1, enable_checkpointing=False)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=BATCHES + 3, save_top_k=-1
    )  # a checkpoint taken inside epoch 2, at the end of its third batch
    run(tmp_path / "first", BATCHES + 3, callbacks=[checkpoint])
    path = next((tmp_path / "ckpt").glob(f"*step={BATCHES + 3}*.ckpt"))
    resumed = run(tmp_path / "resumed", -1, ckpt_path=str(path), enable_checkpointing=False)
    assert len(full.steps) == EPOCHS * BATCHES and len(resumed.steps) == EPOCHS * BATCHES - (
        BATCHES + 3
    )
    assert [t for t, _ in resumed.tasks] == [t for t, _ in full.tasks][BATCHES + 3 :]
    assert equal(
        [p.detach() for p in resumed.parameters()], [p.detach() for p in full.parameters()]
    )
    assert equal(resumed.phi, full.phi)
