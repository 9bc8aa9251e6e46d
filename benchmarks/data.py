"""Readers for the multilingual datasets in the layout of ``../shared/data`` (offline copies).

The data are never part of this repository: pass ``--data-dir`` or keep the shared folder
beside the checkout (``<checkout>/../shared/data``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

Sentence = tuple[list[str], list[str]]


def default_data_dir() -> Path:
    """``../shared/data`` next to this checkout."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_conll(path: Path) -> list[Sentence]:
    """``token TAG`` per line (space or tab separated), blank line between sentences."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if not fields:
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        tokens.append(fields[-2] if len(fields) > 2 else fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def masakhaner(data_dir: Path, language: str, split: str) -> list[Sentence]:
    """MasakhaNER 1.0 ``split`` (train/dev/test) of ``language`` (e.g. ``hau``)."""
    path = data_dir / "masakhaner" / language / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: pass --data-dir pointing at a folder with masakhaner/{language}/"
        )
    return read_conll(path)


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of each BIO entity; an I- tag that does not continue starts one."""
    spans = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind and start >= 0
        if start >= 0 and not continues:
            spans.add((start, i, kind))
            start, kind = -1, ""
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return spans


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Micro entity-level F1 (conlleval style) over sentences."""
    true_positive = found = expected = 0
    for g, p in zip(gold, predicted, strict=True):
        gold_spans, predicted_spans = entity_spans(g), entity_spans(p)
        true_positive += len(gold_spans & predicted_spans)
        found += len(predicted_spans)
        expected += len(gold_spans)
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / found, true_positive / expected
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------ more formats
# The readers below cover every format in ``../shared/data`` (see its README) plus two
# files it lacks but that a user may drop into the same layout: ``squad/train-v1.1.json``
# (SQuAD v1.1) and ``mnli/train.tsv`` (``premise<TAB>hypothesis<TAB>label``).


@dataclass
class QAExample:
    """One SQuAD-format question with its passage and gold answers."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


@dataclass
class NLIExample:
    """A premise/hypothesis pair with its label (``entailment``/``neutral``/``contradiction``)."""

    premise: str
    hypothesis: str
    label: str


NLI_LABELS = ["entailment", "neutral", "contradiction"]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: pass --data-dir pointing at a folder with {what}"
        )
    return path


def wikiann(data_dir: Path, language: str, split: str) -> list[Sentence]:
    """WikiANN (XTREME sizes) ``split`` (train/val/test; ``dev`` means ``val``)."""
    split = "val" if split == "dev" else split
    path = data_dir / "wikiann" / language / f"{split}.conllu"
    return read_conll(_require(path, f"wikiann/{language}/{split}.conllu"))


def read_squad(path: Path) -> list[QAExample]:
    """Every question of a SQuAD-format JSON file (v1.1 layout)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    examples = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                examples.append(
                    QAExample(
                        id=str(qa["id"]),
                        question=qa["question"],
                        context=paragraph["context"],
                        answers=[a["text"] for a in qa["answers"]],
                        answer_starts=[int(a["answer_start"]) for a in qa["answers"]],
                    )
                )
    return examples


def tydiqa(data_dir: Path, language: str, split: str) -> list[QAExample]:
    """TyDi QA Gold Passage v1.1 ``split`` (train/dev) of ``language`` (e.g. ``sw``)."""
    folder = data_dir / "tydiqa_goldp" / f"tydiqa-goldp-v1.1-{split}"
    path = folder / f"tydiqa.goldp.{language}.{split}.json"
    return read_squad(_require(path, f"tydiqa_goldp/tydiqa-goldp-v1.1-{split}/{path.name}"))


def mlqa(data_dir: Path, language: str, split: str = "dev") -> list[QAExample]:
    """MLQA v1 same-language pairs (only ``dev`` is kept offline)."""
    path = data_dir / "mlqa_dev" / f"{split}-context-{language}-question-{language}.json"
    return read_squad(_require(path, f"mlqa_dev/{path.name}"))


def squad(data_dir: Path, split: str = "train") -> list[QAExample]:
    """SQuAD v1.1 from ``squad/{train,dev}-v1.1.json`` (not in the shared offline copy)."""
    path = data_dir / "squad" / f"{split}-v1.1.json"
    return read_squad(_require(path, f"squad/{path.name} (SQuAD is not in ../shared/data)"))


def read_nli_tsv(path: Path) -> list[NLIExample]:
    """``premise<TAB>hypothesis<TAB>label`` per line (a header line is skipped)."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[2] not in NLI_LABELS:
            continue
        examples.append(NLIExample(fields[0], fields[1], fields[2]))
    return examples


def xnli(data_dir: Path, language: str, split: str) -> list[NLIExample]:
    """XNLI ``split`` (dev/test) of ``language``."""
    return read_nli_tsv(_require(data_dir / "xnli" / f"{split}-{language}.tsv", "xnli/"))


def mnli(data_dir: Path, split: str = "train") -> list[NLIExample]:
    """MNLI from ``mnli/{split}.tsv`` (not in the shared offline copy)."""
    path = data_dir / "mnli" / f"{split}.tsv"
    return read_nli_tsv(_require(path, f"mnli/{split}.tsv (MNLI is not in ../shared/data)"))
