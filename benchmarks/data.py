"""Readers for the multilingual datasets in the layout of ``../shared/data`` (offline copies).

The data are never part of this repository: pass ``--data-dir`` or keep the shared folder
beside the checkout (``<checkout>/../shared/data``).
"""

from __future__ import annotations

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
