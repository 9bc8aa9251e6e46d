"""SeqReptileTrainer end to end with a tiny local BERT: single-task batches, slow-weight
checkpoints (loadable into a plain SeqReptile), exact resume from inside a trajectory, and
probe logging; SurgeryTrainer against a hand-written loop."""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset  # noqa: E402

import torch_seqreptile.integrations as integrations  # noqa: E402
from torch_seqreptile import SeqReptile  # noqa: E402
from torch_seqreptile.integrations.transformers import (  # noqa: E402
    ProbeCallback,
    SeqReptileTrainer,
    find_slow_optimizer,
)
from torch_seqreptile.probes import l2_distance  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASK_SIZES = [20, 12, 8]
FAST_WEIGHTS = "seqreptile_fast_weights.safetensors"  # theta, in every checkpoint folder


pytestmark = pytest.mark.usefixtures("one_thread")


SEQ = 6


class TaskData(Dataset[dict[str, Any]]):
    """Task t: token sequences whose label is a task-specific rule."""

    def __init__(self, task: int, size: int) -> None:
        g = torch.Generator().manual_seed(100 + task)
        self.ids = torch.randint(5, 40, (size, SEQ), generator=g)
        self.labels = ((self.ids.sum(1) + task) % 2).long()
        self.task = task

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "task": self.task}


class RecordingCollator:
    """Stacks a batch and records the task of every example (then drops the field)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.batches.append([f["task"] for f in features])
        return {
            "input_ids": torch.stack([f["input_ids"] for f in features]),
            "attention_mask": torch.ones(len(features), SEQ, dtype=torch.long),
            "labels": torch.stack([f["labels"] for f in features]),
        }


def tiny_bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.1,  # dropout on: the resumed run must restore the RNG too
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def train_dataset() -> ConcatDataset[dict[str, Any]]:
    return ConcatDataset([TaskData(t, n) for t, n in enumerate(TASK_SIZES)])


def make_trainer(
    out: Path, max_steps: int, collator: RecordingCollator | None = None, **kwargs: Any
) -> Any:
    grad_accum = kwargs.pop("gradient_accumulation_steps", 1)
    callbacks = kwargs.pop("callbacks", None)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=kwargs.pop("save_steps", 1000),
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return SeqReptileTrainer(
        model=kwargs.pop("model", None) or tiny_bert(),
        args=args,
        train_dataset=train_dataset(),
        eval_dataset=TaskData(0, 8),
        data_collator=collator or RecordingCollator(),
        callbacks=callbacks,
        inner_steps=4,
        outer_lr=0.5,
        num_batches=kwargs.pop("num_batches", 4),  # several Trainer epochs in 10 steps
        **kwargs,
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def slow_weights(opt: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """phi of every parameter the SeqReptile tracks, by parameter name."""
    return {
        name: opt.state[p]["slow_weight"].clone()
        for name, p in model.named_parameters()
        if p in opt.state
    }


def inner_steps_taken(opt: Any) -> set[int]:
    """The inner AdamW's step count of every tracked parameter: one per inner step."""
    assert len(opt.state) > 0
    return {int(opt.optimizer.state[p]["step"]) for p in opt.state}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested dicts/lists of tensors and plain values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Snapshot(transformers.TrainerCallback):  # type: ignore[misc]
    """Records phi, theta and the SeqReptile's state_dict after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.phi: dict[str, torch.Tensor] = {}
        self.theta: dict[str, torch.Tensor] = {}
        self.state_dict: dict[str, Any] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            opt = find_slow_optimizer(kwargs["optimizer"])
            assert isinstance(opt, SeqReptile)
            self.phi = slow_weights(opt, kwargs["model"])
            self.theta = weights(kwargs["model"])
            self.state_dict = copy.deepcopy(opt.state_dict())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("full")
    collator = RecordingCollator()
    snap = Snapshot(6)
    trainer = make_trainer(out, 10, collator, save_steps=6, callbacks=[snap])
    trainer.train()
    return {"out": out, "collator": collator, "trainer": trainer, "snap": snap}


def test_single_task_batches_and_outer_updates(uninterrupted: dict[str, Any]) -> None:
    # the DataLoader may prefetch one batch beyond the last step
    batches = uninterrupted["collator"].batches
    assert len(batches) in (10, 11)
    assert all(len(set(b)) == 1 and len(b) == 4 for b in batches)
    assert len({b[0] for b in batches}) > 1  # several tasks were drawn
    trainer = uninterrupted["trainer"]
    opt = trainer.seqreptile
    assert type(opt) is SeqReptile  # a plain SeqReptile, no subclass
    assert trainer.state.global_step == 10 and inner_steps_taken(opt) == {10}
    assert opt.trajectory_step == 0  # finalize=True ended the last (partial) trajectory
    assert len(opt.state) > 0
    for p in opt.params():  # the model holds phi at the end
        if p in opt.state:
            assert torch.equal(p.detach(), opt.state[p]["slow_weight"])


def test_checkpoint_inside_trajectory_holds_phi_and_theta(uninterrupted: dict[str, Any]) -> None:
    ckpt = uninterrupted["out"] / "checkpoint-6"
    snap = uninterrupted["snap"]
    saved = load_file(str(ckpt / "model.safetensors"))
    # the model file holds phi (6 % 4 = 2: inside the second trajectory, phi != theta)
    assert len(snap.phi) > 0
    moved = 0
    for name, phi in snap.phi.items():
        assert torch.equal(saved[name], phi)
        moved += int(not torch.equal(phi, snap.theta[name]))
    assert moved > 0
    # optimizer.pt is exactly SeqReptile.state_dict() at step 6, in torch's layout
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state.keys() == {"state", "param_groups"}
    assert_same(state, snap.state_dict)
    assert {group["trajectory_step"] for group in state["param_groups"]} == {2}
    assert {int(entry["step"]) for entry in state["state"].values()} == {6}  # 6 inner steps
    # theta of the running trajectory, for exactly the parameters with slow weights
    fast = load_file(str(ckpt / FAST_WEIGHTS))
    assert fast.keys() == snap.phi.keys()
    for name, theta in fast.items():
        assert torch.equal(theta, snap.theta[name])


def test_resume_equals_uninterrupted_run(uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    collator = RecordingCollator()
    trainer = make_trainer(tmp_path, 10, collator)
    trainer.train(resume_from_checkpoint=str(uninterrupted["out"] / "checkpoint-6"))
    expected = uninterrupted["trainer"].model.state_dict()
    got = trainer.model.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the resumed run saw exactly the batches the uninterrupted one saw after step 6
    assert collator.batches == uninterrupted["collator"].batches[6:]
    a, b = uninterrupted["trainer"].seqreptile, trainer.seqreptile
    assert uninterrupted["trainer"].state.global_step == trainer.state.global_step == 10
    assert inner_steps_taken(a) == inner_steps_taken(b) == {10}
    pa, pb = list(a.params()), list(b.params())
    assert [p in a.state for p in pa] == [p in b.state for p in pb]
    for p, q in zip(pa, pb):
        if p in a.state:
            assert torch.equal(a.state[p]["slow_weight"], b.state[q]["slow_weight"])
    assert_same(a.state_dict(), b.state_dict())


def test_checkpoint_optimizer_loads_into_plain_seqreptile(tmp_path: Path) -> None:
    model = tiny_bert()
    snap = Snapshot(3)
    trainer = make_trainer(
        tmp_path,
        5,
        save_steps=3,
        callbacks=[snap],
        model=model,
        optimizers=(torch.optim.AdamW(model.parameters(), lr=5e-3), None),
    )
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    files = {"model.safetensors", "optimizer.pt", "scheduler.pt", FAST_WEIGHTS}
    assert files <= {p.name for p in ckpt.iterdir()}
    # a plain SeqReptile around the same inner optimizer, outside any Trainer
    fresh = tiny_bert()
    plain = SeqReptile(torch.optim.AdamW(fresh.parameters(), lr=5e-3), inner_steps=4, outer_lr=0.5)
    plain.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    assert plain.trajectory_step == 3
    phi = slow_weights(plain, fresh)
    assert phi.keys() == snap.phi.keys() and len(phi) > 0
    for name in phi:  # the slow weights are the Trainer's at step 3
        assert torch.equal(phi[name], snap.phi[name]), name
    assert_same(plain.state_dict(), snap.state_dict)  # inner state and groups too
    # the model file (phi) and the fast-weights file (theta) complete the picture
    fresh.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    for name, p in fresh.named_parameters():
        assert torch.equal(p, snap.phi.get(name, snap.theta[name])), name
    fresh.load_state_dict(load_file(str(ckpt / FAST_WEIGHTS)), strict=False)
    assert any(not torch.equal(snap.phi[n], snap.theta[n]) for n in snap.phi)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, snap.theta[name]), name
    # hyperparameter-search checkpoints carry theta too
    trainer._tune_save_checkpoint(str(tmp_path / "tune"))
    tune = tmp_path / "tune" / "checkpoint-5"
    assert (tune / "optimizer.pt").is_file()
    assert load_file(str(tune / FAST_WEIGHTS)).keys() == phi.keys()


def test_resume_needs_the_fast_weights_inside_a_trajectory(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted["out"] / "checkpoint-6", ckpt)
    (ckpt / FAST_WEIGHTS).unlink()
    trainer = make_trainer(tmp_path / "out", 10)
    with pytest.raises(FileNotFoundError, match=FAST_WEIGHTS):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_import_without_transformers_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m.startswith("torch_seqreptile.integrations.")]:
        monkeypatch.setattr(integrations, name.rsplit(".", 1)[1], sys.modules[name])
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "torch-seqreptile\[hf\]"') as error:
        importlib.import_module("torch_seqreptile.integrations.transformers")
    assert isinstance(error.value.__cause__, ImportError)


def test_evaluate_and_save_use_slow_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 6, finalize=False)
    trainer.train()
    opt = trainer.seqreptile
    assert opt.trajectory_step == 2
    theta = weights(trainer.model)
    metrics = trainer.evaluate()
    assert all(torch.equal(theta[k], v) for k, v in weights(trainer.model).items())
    # evaluate on phi by hand: loss of the eval set with phi in the model
    with opt.slow_weights():
        phi = weights(trainer.model)
        trainer.model.eval()
        batch = RecordingCollator()([trainer.eval_dataset[i] for i in range(8)])
        with torch.no_grad():
            loss = float(trainer.model(**batch).loss)
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(saved[k], phi[k]) for k in phi)
    assert any(not torch.equal(phi[k], theta[k]) for k in phi)


def test_gradient_accumulation_keeps_one_task_per_step(tmp_path: Path) -> None:
    collator = RecordingCollator()
    trainer = make_trainer(tmp_path, 4, collator, gradient_accumulation_steps=2)
    trainer.train()
    batches = collator.batches
    assert len(batches) == 8
    for k in range(0, 8, 2):  # the two micro-batches of each optimizer step share a task
        assert len(set(batches[k] + batches[k + 1])) == 1
    assert trainer.state.global_step == 4 and inner_steps_taken(trainer.seqreptile) == {4}


def test_probe_callback_logs_and_does_not_disturb(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    probe_batches = [
        RecordingCollator()([TaskData(t, n)[i] for i in range(4)]) for t, n in enumerate(TASK_SIZES)
    ]
    callback = ProbeCallback(
        probe_batches,
        every_n_steps=5,
        params=lambda m: m.bert.encoder,
        mode="sketch",
        sketch_dim=512,
    )
    trainer = make_trainer(tmp_path, 10, callbacks=[callback])
    assert callback.trainer is trainer
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "probe/mean_cosine" in entry]
    assert [entry["step"] for entry in logged] == [5, 10]
    for entry in logged:
        assert -1.0 <= entry["probe/mean_cosine"] <= 1.0
        assert all(entry[f"probe/grad_norm/task_{t}"] > 0 for t in range(3))
        assert entry["probe/l2_distance"] > 0
    assert [step for step, *_ in callback.history] == [5, 10]
    # the distance is that of phi from the starting weights
    assert logged[-1]["probe/l2_distance"] == pytest.approx(
        l2_distance(trainer.model, tiny_bert()), rel=1e-6
    )
    expected = uninterrupted["trainer"].model.state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    json.dumps(trainer.state.log_history)  # loggers can serialise it


def test_probe_callback_with_plain_trainer(tmp_path: Path) -> None:
    probe_batches = [RecordingCollator()([TaskData(t, 4)[i] for i in range(4)]) for t in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TaskData(0, 8),
        data_collator=RecordingCollator(),
    )
    ProbeCallback(probe_batches, every_n_steps=1).attach(trainer)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "probe/mean_cosine" in e] == [1, 2]


def test_trainer_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        SeqReptileTrainer(
            model=tiny_bert(),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path), use_cpu=True, report_to=[]
            ),
            inner_steps=0,
            outer_lr=0.1,
        )
    trainer = make_trainer(tmp_path, 2, task_sizes=[10, 10])
    with pytest.raises(ValueError, match="task_sizes"):
        trainer.get_train_dataloader()
    with pytest.raises(ValueError, match="every_n_steps"):
        ProbeCallback([{}, {}], every_n_steps=0)


# ---------------------------------------------------------------------- SurgeryTrainer
from torch.nn import functional as F  # noqa: E402

from torch_seqreptile.integrations.transformers import (  # noqa: E402
    SurgeryTrainer,
    find_surgery_optimizer,
)
from torch_seqreptile.surgery import MGDA, MTL, CAGrad, GradNorm, GradVac, PCGrad  # noqa: E402

SURGERY_STEPS = 6


class BatchRecordingCollator(RecordingCollator):
    """A RecordingCollator that also keeps every collated batch."""

    def __init__(self) -> None:
        super().__init__()
        self.collated: list[dict[str, torch.Tensor]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        self.collated.append({k: v.clone() for k, v in batch.items()})
        return batch


class GradRecorder(transformers.TrainerCallback):  # type: ignore[misc]
    """The gradient the optimizer is about to apply, at every step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})


def tiny_bert_without_dropout() -> Any:
    model = tiny_bert()
    for module in model.modules():  # deterministic forward: the hand loop needs no RNG
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    model.config.hidden_dropout_prob = 0.0
    return model


def make_surgery_trainer(
    out: Path,
    method: Any,
    max_steps: int,
    collator: RecordingCollator | None = None,
    **kwargs: Any,
) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=3,  # per task: 6 rows per batch
        gradient_accumulation_steps=kwargs.pop("gradient_accumulation_steps", 1),
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0),
        save_strategy="steps",
        save_steps=kwargs.pop("save_steps", 1000),
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return SurgeryTrainer(
        model=kwargs.pop("model", None) or tiny_bert(),
        args=args,
        train_dataset=train_dataset(),
        data_collator=collator or RecordingCollator(),
        method=method,
        tasks_per_step=kwargs.pop("tasks_per_step", 2),
        num_batches=kwargs.pop("num_batches", 4),  # several Trainer epochs
        **kwargs,
    )


@pytest.mark.parametrize("method", [MTL, PCGrad], ids=["MTL", "PCGrad"])
def test_surgery_trainer_equals_hand_written_loop(method: Any, tmp_path: Path) -> None:
    model = tiny_bert_without_dropout()
    start = weights(model)
    inner = torch.optim.AdamW(model.parameters(), lr=5e-3)
    collator = BatchRecordingCollator()
    recorder = GradRecorder()
    trainer = make_surgery_trainer(
        tmp_path,
        method,
        SURGERY_STEPS,
        collator,
        model=model,
        optimizers=(inner, None),
        callbacks=[recorder],
        max_grad_norm=0.0,  # compare the combined gradient itself, unclipped
    )
    trainer.train()
    surgery = trainer.surgery
    assert type(surgery) is method and surgery.optimizer is inner and surgery.num_tasks == 2
    assert find_surgery_optimizer(trainer.optimizer) is surgery
    assert len(recorder.grads) == SURGERY_STEPS
    for tasks in collator.batches:  # one mini-batch of each of 2 distinct tasks
        assert len(tasks) == 6 and len(set(tasks)) == 2
        assert tasks == sorted(tasks) and tasks.count(tasks[0]) == 3

    # the same steps by hand: per-task mean losses -> surgery backward -> step
    hand = tiny_bert_without_dropout()
    with torch.no_grad():
        for name, p in hand.named_parameters():
            p.copy_(start[name])
    hand_inner = torch.optim.AdamW(hand.parameters(), lr=5e-3)
    kwargs = {"seed": 0} if method.uses_rng else {}  # the trainer seeds with args.seed
    opt = method(hand_inner, num_tasks=2, **kwargs)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, SURGERY_STEPS)
    hand.train()
    projected = 0
    for step in range(SURGERY_STEPS):
        batch = collator.collated[step]
        task_ids = torch.tensor(collator.batches[step])
        logits = hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
        losses = [per_example[task_ids == t].mean() for t in sorted(set(task_ids.tolist()))]
        opt.zero_grad()
        opt.backward(losses)
        projected += int(not torch.all(opt.last_weights == 1.0))
        for name, p in hand.named_parameters():  # same ops in the same order: bit for bit
            assert p.grad is not None
            assert torch.equal(recorder.grads[step][name], p.grad), (step, name)
        opt.step()
        sched.step()
    assert projected > 0 if method is PCGrad else projected == 0  # PCGrad != MTL here
    trained = dict(trainer.model.named_parameters())
    for name, p in hand.named_parameters():
        assert torch.equal(trained[name], p), name


@pytest.mark.parametrize("method", [MTL, PCGrad], ids=["MTL", "PCGrad"])
def test_surgery_trainer_resume_equals_uninterrupted(method: Any, tmp_path: Path) -> None:
    # dropout on: the resumed run also needs the Trainer's RNG state
    full_collator = RecordingCollator()
    full = make_surgery_trainer(tmp_path / "full", method, 7, full_collator, save_steps=5)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-5"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state.keys() == {"state", "param_groups", "surgery"}
    surgery = state["surgery"]
    assert surgery["num_tasks"] == 2 and (surgery["rng_state"] is not None) == method.uses_rng
    collator = RecordingCollator()
    resumed = make_surgery_trainer(tmp_path / "resumed", method, 7, collator)
    resumed.train(resume_from_checkpoint=str(ckpt))
    expected = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert collator.batches == full_collator.batches[5:]  # incl. any prefetched batch
    a, b = full.surgery, resumed.surgery
    if method.uses_rng:
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for p, q in zip(a.params(), b.params()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.optimizer.state[p][key], b.optimizer.state[q][key])


def test_surgery_trainer_every_method_and_callable(tmp_path: Path) -> None:
    methods: list[Any] = [GradVac, GradNorm, MGDA, lambda opt: CAGrad(opt, c=0.4)]
    for i, method in enumerate(methods):
        collator = RecordingCollator()
        trainer = make_surgery_trainer(
            tmp_path / str(i), method, 2, collator, tasks_per_step=3, num_batches=2
        )
        trainer.train()
        assert trainer.surgery.num_tasks == 3 and trainer.surgery.last_weights is not None
        assert all(len(set(tasks)) == 3 for tasks in collator.batches)


def test_surgery_trainer_mtl_gradient_accumulation(tmp_path: Path) -> None:
    model = tiny_bert_without_dropout()
    start = weights(model)
    collator = BatchRecordingCollator()
    recorder = GradRecorder()
    trainer = make_surgery_trainer(
        tmp_path,
        MTL,
        1,
        collator,
        model=model,
        callbacks=[recorder],
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
    )
    trainer.train()
    assert len(collator.batches) in (2, 3)  # two micro-batches (and maybe one prefetched)
    # the step's gradient is that of the per-task mean losses summed over tasks, averaged
    # over the two micro-batches
    hand = tiny_bert_without_dropout()
    with torch.no_grad():
        for name, p in hand.named_parameters():
            p.copy_(start[name])
    hand.train()
    total = torch.zeros(())
    for batch, tasks in zip(collator.collated[:2], collator.batches[:2]):
        task_ids = torch.tensor(tasks)
        logits = hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
        for t in sorted(set(tasks)):
            total = total + per_example[task_ids == t].mean() / 2
    total.backward()
    for name, p in hand.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(recorder.grads[0][name], p.grad, rtol=1e-5, atol=1e-7)


def test_surgery_trainer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_surgery_trainer(tmp_path, PCGrad, 2, gradient_accumulation_steps=2).train()
    with pytest.raises(ValueError, match="tasks_per_step >= 3"):
        make_surgery_trainer(tmp_path, GradVac, 2, tasks_per_step=2).train()
    with pytest.raises(ValueError, match="num_tasks=3"):
        make_surgery_trainer(tmp_path, lambda opt: PCGrad(opt, num_tasks=3), 2).train()
    with pytest.raises(TypeError, match="inner optimizer"):
        model = tiny_bert()
        wrapped = PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
        make_surgery_trainer(tmp_path, PCGrad, 2, model=model, optimizers=(wrapped, None)).train()
    with pytest.raises(TypeError, match="surgery"):
        make_surgery_trainer(tmp_path, torch.optim.SGD, 2)
    with pytest.raises(ValueError, match="loss_fn"):
        trainer = make_surgery_trainer(tmp_path, MTL, 1, loss_fn=lambda out, labels: out.logits)
        trainer.train()


def test_surgery_trainer_mixed_precision(tmp_path: Path) -> None:
    def args(**flag: bool) -> Any:
        return transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=3,
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
            save_strategy="no",
            **flag,
        )

    common: dict[str, Any] = {
        "train_dataset": train_dataset(),
        "data_collator": RecordingCollator(),
        "method": PCGrad,
        "tasks_per_step": 3,
    }
    trainer = SurgeryTrainer(model=tiny_bert(), args=args(bf16=True), **common)
    trainer.train()  # bf16 autocast: no GradScaler, every method works
    assert trainer.state.global_step == 2 and trainer.surgery.last_weights is not None
    with pytest.raises(ValueError, match="fp16"):
        SurgeryTrainer(model=tiny_bert(), args=args(fp16=True), **common)
