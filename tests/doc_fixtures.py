"""The names the documentation's code blocks use without defining them: one visible place.

``conftest.py`` (at the repository root) runs every ``python`` block of ``README.md`` and
``docs/*.md`` with Sybil; the blocks of one page share a namespace, in page order, which
starts as :func:`namespace` below. A page defines everything else itself. A block that is
not run carries a visible ``<!-- skip: next "reason" -->`` comment.

* ``model``: a tiny, randomly initialised ``BertForSequenceClassification`` (no download),
  called as ``model(**batch)`` and returning an output with ``.loss``;
* ``task_datasets``: three tasks of 200, 80 and 20 examples, each example a dict
  ``{"input_ids": (8,) int64, "labels": int64}`` (label = (sum of tokens + t) mod 2);
* ``evaluate(model)``: accuracy on the third task;
* ``mlm_model``, ``tokenizer``: a tiny ``BertForMaskedLM`` and a ``BertTokenizerFast`` on a
  20-word vocabulary written to the temporary directory;
* ``path``: a file name in a fresh temporary directory (also the working directory).

The environment is that of one process launched by ``torchrun --nproc-per-node=1``
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), for ``docs/distributed.md``;
a process group a page creates is destroyed after it.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


class Task(Dataset[dict[str, torch.Tensor]]):
    """Task t: 8 random tokens, label = (sum of tokens + t) mod 2."""

    def __init__(self, t: int, n: int) -> None:
        generator = torch.Generator().manual_seed(t)
        self.x = torch.randint(5, 40, (n, 8), generator=generator)
        self.y = (self.x.sum(1) + t) % 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "far", "on", "mat", "and"]


def tiny_masked_lm(directory: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertForMaskedLM(config), tokenizer


@torch.no_grad()
def evaluate(model: torch.nn.Module) -> float:
    data = Task(2, 20)
    was_training = model.training
    model.eval()
    logits = model(input_ids=data.x).logits
    model.train(was_training)
    return float((logits.argmax(-1) == data.y).float().mean())


def torchrun_environment() -> None:
    """What ``torchrun --nproc-per-node=1`` sets, with a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    os.environ.update({**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def namespace() -> dict[str, Any]:
    """A fresh namespace for one page (its working directory is a new temporary one)."""
    directory = Path(tempfile.mkdtemp(prefix="docs-"))
    os.chdir(directory)
    torchrun_environment()
    mlm_model, tokenizer = tiny_masked_lm(directory)
    return {
        "mlm_model": mlm_model,
        "tokenizer": tokenizer,
        "model": tiny_bert(),
        "task_datasets": [Task(t, n) for t, n in enumerate([200, 80, 20])],
        "evaluate": evaluate,
        "path": str(directory / "checkpoint.pt"),
    }
