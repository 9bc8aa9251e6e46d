"""Tasks of the paper's NLP experiments: data, presets, features, metrics.

Every task is a list of *training tasks* (one per language, or four clusters of English data
for the zero-shot tables), dev sets for model selection and learning curves, and test /
zero-shot sets. Data come from a local folder in the layout of ``../shared/data``
(``source="local"``) or from the ``datasets`` hub (``source="hub"``, needs internet);
``"auto"`` picks the local folder when it holds the files.
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import data as D
from benchmarks.data import NLI_LABELS, NLIExample, QAExample, Sentence

Example = Sentence | QAExample | NLIExample

MASAKHANER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"]
WIKIANN_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


@dataclass
class Preset:
    """A task's settings. ``paper`` values follow Sec. 4.2-4.3; ``offline`` ones fit 2 CPUs."""

    kind: str  # "ner" | "qa" | "nli"
    train_langs: list[str]
    dev_langs: list[str]
    test_langs: list[str]
    zero_shot_langs: list[str]
    batch_size: int
    max_length: int
    lr: float = 3e-5
    outer_lr: float = 0.1
    inner_steps: int = 1000
    q: float = 0.2
    tasks_per_step: int = 8
    clusters: int = 0  # >0: split one English training set into this many tasks (Sec. 4.3)
    table: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


PAPER_WIKIANN = ["de", "en", "es", "hi", "jv", "kk", "mr", "my", "sw", "te", "tl", "yo"]
OFFLINE_WIKIANN = ["de", "en", "es", "nl", "pl", "ru"]
TYDI_LANGS = ["ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"]
XNLI_LANGS = ["ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"]

PRESETS: dict[str, dict[str, Preset]] = {
    "wikiann": {
        "paper": Preset("ner", PAPER_WIKIANN, PAPER_WIKIANN, PAPER_WIKIANN, [], 16, 128,
                        table="Table 2"),
        "offline": Preset("ner", OFFLINE_WIKIANN, OFFLINE_WIKIANN, OFFLINE_WIKIANN, [], 16, 64,
                          table="Table 2",
                          notes="only de,en,es,nl,pl,ru are offline; not the paper's 12"),
    },
    "tydiqa": {
        "paper": Preset("qa", TYDI_LANGS, TYDI_LANGS, TYDI_LANGS, [], 12, 384, table="Table 1"),
        "offline": Preset("qa", ["en", "ko", "sw"], ["en", "ko", "sw"], TYDI_LANGS, [], 12, 256,
                          table="Table 1",
                          notes="train only en,ko,sw offline; the others are zero-shot there"),
    },
    "tydi_mlqa": {
        "paper": Preset("qa", TYDI_LANGS, TYDI_LANGS, [], ["de", "es", "hi", "vi", "zh"], 12,
                        384, table="Table 3", notes="MLQA test"),
        "offline": Preset("qa", ["en", "ko", "sw"], ["en", "ko", "sw"], [],
                          ["de", "es", "hi", "vi", "zh"], 12, 256, table="Table 3",
                          notes="MLQA dev (test is not offline)"),
    },
    "squad_mlqa": {
        "paper": Preset("qa", ["c0", "c1", "c2", "c3"], ["en"], [],
                        ["ar", "de", "es", "hi", "vi", "zh"], 12, 384, q=0.0, tasks_per_step=4,
                        clusters=4, table="Table 4"),
    },
    "mnli_xnli": {
        "paper": Preset("nli", ["c0", "c1", "c2", "c3"], ["en"], [], XNLI_LANGS, 32, 128,
                        q=0.0, tasks_per_step=4, clusters=4, table="Table 5"),
    },
    "masakhaner": {
        "paper": Preset("ner", ["hau", "ibo", "kin", "swa", "yor"],
                        ["hau", "ibo", "kin", "swa", "yor"], ["hau", "ibo", "kin", "swa", "yor"],
                        ["pcm", "wol", "lug", "luo", "amh"], 16, 128),
        "offline": Preset("ner", ["hau", "ibo", "kin", "swa", "yor"],
                          ["hau", "ibo", "kin", "swa", "yor"],
                          ["hau", "ibo", "kin", "swa", "yor"],
                          ["pcm", "wol", "lug", "luo", "amh"], 16, 64, tasks_per_step=5,
                          notes="rebuilt multilingual-e5-small, frozen word embeddings"),
    },
}  # fmt: skip


def preset(task: str, scale: str) -> Preset:
    """The preset of ``task`` at ``scale`` (``paper`` or ``offline``; falls back to paper)."""
    if task not in PRESETS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(PRESETS)}")
    table = PRESETS[task]
    return table.get(scale, table["paper"])


# --------------------------------------------------------------------------- loading
def _hub(name: str, config: str | None, split: str) -> Any:
    import datasets  # only with internet

    return datasets.load_dataset(name, config, split=split)


def _hub_ner(name: str, language: str, split: str) -> list[Sentence]:
    split = {"dev": "validation", "val": "validation"}.get(split, split)
    ds = _hub(name, language, split)
    names = ds.features["ner_tags"].feature.names
    return [(list(r["tokens"]), [names[t] for t in r["ner_tags"]]) for r in ds]


def _hub_qa(rows: Any) -> list[QAExample]:
    return [
        QAExample(
            str(r["id"]),
            r["question"],
            r["context"],
            list(r["answers"]["text"]),
            [int(s) for s in r["answers"]["answer_start"]],
        )
        for r in rows
    ]


_TYDI_NAMES = {
    "ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
    "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu",
}  # fmt: skip


def _hub_nli(rows: Any) -> list[NLIExample]:
    return [NLIExample(r["premise"], r["hypothesis"], NLI_LABELS[r["label"]]) for r in rows]


def load_split(
    dataset: str, language: str, split: str, data_dir: Path | None, source: str
) -> list[Any]:
    """Examples of ``dataset`` (masakhaner, wikiann, tydiqa, mlqa, squad, xnli, mnli)."""
    local = source == "local" or (source == "auto" and data_dir is not None and data_dir.exists())
    if local:
        if data_dir is None:
            raise ValueError("source='local' needs a data directory")
        readers: dict[str, Callable[[], list[Any]]] = {
            "masakhaner": lambda: D.masakhaner(data_dir, language, split),
            "wikiann": lambda: D.wikiann(data_dir, language, split),
            "tydiqa": lambda: D.tydiqa(data_dir, language, split),
            "mlqa": lambda: D.mlqa(data_dir, language, split),
            "squad": lambda: D.squad(data_dir, split),
            "xnli": lambda: D.xnli(data_dir, language, split),
            "mnli": lambda: D.mnli(data_dir, split),
        }
        return readers[dataset]()
    if dataset in ("masakhaner", "wikiann"):
        return _hub_ner(dataset, language, split)
    if dataset == "tydiqa":
        rows = _hub("tydiqa", "secondary_task", "train" if split == "train" else "validation")
        prefix = _TYDI_NAMES[language] + "-"
        return _hub_qa(r for r in rows if str(r["id"]).startswith(prefix))
    if dataset == "mlqa":
        hub_split = "validation" if split == "dev" else split
        return _hub_qa(_hub("mlqa", f"mlqa.{language}.{language}", hub_split))
    if dataset == "squad":
        return _hub_qa(_hub("squad", None, "train" if split == "train" else "validation"))
    if dataset == "xnli":
        return _hub_nli(_hub("xnli", language, "validation" if split == "dev" else split))
    if dataset == "mnli":
        rows = _hub("multi_nli", None, "train" if split == "train" else "validation_matched")
        return _hub_nli(rows)
    raise ValueError(f"unknown dataset {dataset!r}")


# -------------------------------------------------------------------------- features
@dataclass
class Feature:
    """One model input: token ids plus the targets of its kind."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    labels: list[int] | None = None  # NER: per token (-100 = ignored)
    start: int = 0  # QA: answer token span (0/0 = not in this window)
    end: int = 0
    label: int = -1  # NLI
    example: int = 0  # index of the source example (QA windows, NER words)
    offsets: list[tuple[int, int] | None] | None = None  # QA: context char spans
    word_ids: list[int | None] | None = None  # NER
    context: list[int] | None = None  # NER windows: per token, its context (ner_windows)


def ner_features(
    tokenizer: Any, sentences: Sequence[Sentence], tags: list[str], max_length: int
) -> list[Feature]:
    """Label the first sub-word of each word; the others get -100. Sentences longer than
    ``max_length`` sub-words are cut (training features; evaluation uses :func:`ner_windows`)."""
    index = {t: i for i, t in enumerate(tags)}
    feats = []
    for n, (words, word_tags) in enumerate(sentences):
        enc = tokenizer(
            list(words), is_split_into_words=True, truncation=True, max_length=max_length
        )
        word_ids = enc.word_ids()
        labels, previous = [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else index.get(word_tags[w], 0))
            previous = w
        feats.append(Feature(enc["input_ids"], labels=labels, example=n, word_ids=word_ids))
    return feats


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of the windows of ``size`` sub-words that cover a sentence of ``length``: one
    every ``stride`` sub-words, the last one ending at the sentence's end (a single window
    at 0 when the sentence fits)."""
    starts = [0]
    while starts[-1] + size < length:
        starts.append(min(starts[-1] + stride, length - size))
    return starts


def ner_windows(
    tokenizer: Any, sentences: Sequence[Sentence], tags: list[str], window: int, stride: int
) -> list[Feature]:
    """Evaluation features that cover every word of every sentence.

    Each sentence is cut into windows of ``window`` tokens (special tokens included, i.e. the
    training length), whose content starts ``stride`` sub-words apart (the last window ends
    at the sentence's end, see :func:`window_starts`); labels as in :func:`ner_features`. A
    sentence that fits gives one window, equal to its :func:`ner_features` feature, and the
    first window of a longer one equals its truncated :func:`ner_features` feature.
    ``context[p]`` is how much context token ``p`` has in its window: the sub-words the
    window shows on its shorter side, where a side on which the window reaches the
    sentence's start or end counts as the whole sentence (nothing is hidden there);
    :func:`window_predictions` predicts each word from its window of most context.

    Windows, not one longer input, because the fine-tuned model has seen inputs of at most
    ``window`` tokens in training: every scored input stays within that length, for any
    sentence length and any position limit of the encoder.
    """
    index = {t: i for i, t in enumerate(tags)}
    feats = []
    for n, (words, word_tags) in enumerate(sentences):
        enc = tokenizer(list(words), is_split_into_words=True, verbose=False)
        ids, word_ids = enc["input_ids"], enc.word_ids()
        inside = [i for i, w in enumerate(word_ids) if w is not None]
        first, last = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
        labels, previous = [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else index.get(word_tags[w], 0))
            previous = w
        prefix, suffix = list(range(first)), list(range(last, len(ids)))
        size = window - len(prefix) - len(suffix)
        if size < 1:
            raise ValueError(f"window {window} leaves no room beside the special tokens")
        length = last - first
        for start in window_starts(length, size, stride):
            end = min(start + size, length)
            left = [p - start if start > 0 else length for p in range(start, end)]
            right = [end - 1 - p if end < length else length for p in range(start, end)]
            rows = [*prefix, *range(first + start, first + end), *suffix]
            context = [0] * len(prefix) + list(map(min, left, right)) + [0] * len(suffix)
            feats.append(
                Feature(
                    [ids[i] for i in rows],
                    labels=[labels[i] for i in rows],
                    example=n,
                    word_ids=[word_ids[i] for i in rows],
                    context=context,
                )
            )
    return feats


def window_predictions(
    feats: Sequence[Feature], logits: Sequence[torch.Tensor], num_words: Sequence[int]
) -> tuple[list[list[int | None]], list[list[int | None]]]:
    """Per sentence and word, the predicted tag id, read at the word's first sub-word
    (``None``: the word has none, e.g. cut off).

    ``(full, truncated)``: ``full`` from the window in which that sub-word has the most
    context (``Feature.context``; ties: the earlier window), ``truncated`` from each
    sentence's first window alone -- the scoring of the truncated features used before
    issue 17. ``feats`` are :func:`ner_windows` features (a sentence's windows in order),
    ``logits`` their per-token logits, ``num_words`` the sentences' word counts.
    """
    full: list[list[int | None]] = [[None] * k for k in num_words]
    truncated: list[list[int | None]] = [[None] * k for k in num_words]
    most = [[-1] * k for k in num_words]
    seen: set[int] = set()
    for f, lg in zip(feats, logits, strict=True):
        opening = f.example not in seen
        seen.add(f.example)
        predicted = lg.argmax(-1).tolist()
        for p, (label, w) in enumerate(zip(f.labels or [], f.word_ids or [], strict=True)):
            if label == -100 or w is None:
                continue
            if opening:
                truncated[f.example][w] = predicted[p]
            context = f.context[p] if f.context else 0
            if context > most[f.example][w]:
                most[f.example][w] = context
                full[f.example][w] = predicted[p]
    return full, truncated


def qa_features(
    tokenizer: Any, examples: Sequence[QAExample], max_length: int, stride: int, train: bool
) -> list[Feature]:
    """SQuAD-style windows over the passage (question first, passage truncated)."""
    if not examples:
        return []
    question_max = max(8, max_length // 4)
    enc = tokenizer(
        [e.question for e in examples],
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=min(stride, max(1, max_length - question_max - 4)),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    feats = []
    for i in range(len(enc["input_ids"])):
        n = enc["overflow_to_sample_mapping"][i]
        sequence_ids = enc.sequence_ids(i)
        offsets = [
            tuple(o) if s == 1 else None
            for o, s in zip(enc["offset_mapping"][i], sequence_ids, strict=True)
        ]
        start = end = 0
        ex = examples[n]
        if train and ex.answers:
            a_start = ex.answer_starts[0]
            a_end = a_start + len(ex.answers[0])
            inside = [j for j, o in enumerate(offsets) if o is not None]
            if inside and offsets[inside[0]][0] <= a_start and offsets[inside[-1]][1] >= a_end:  # type: ignore[index]
                start = next(j for j in inside if offsets[j][1] > a_start)  # type: ignore[index]
                end = max(j for j in inside if offsets[j][0] < a_end)  # type: ignore[index]
                end = max(end, start)
        types = enc["token_type_ids"][i] if "token_type_ids" in enc else None
        feats.append(
            Feature(
                enc["input_ids"][i],
                token_type_ids=types,
                start=start,
                end=end,
                example=n,
                offsets=offsets,
            )
        )
    return feats


def nli_features(tokenizer: Any, examples: Sequence[NLIExample], max_length: int) -> list[Feature]:
    enc = tokenizer(
        [e.premise for e in examples],
        [e.hypothesis for e in examples],
        truncation=True,
        max_length=max_length,
    )
    types = enc.get("token_type_ids")
    return [
        Feature(
            ids,
            token_type_ids=None if types is None else types[i],
            label=NLI_LABELS.index(examples[i].label),
            example=i,
        )
        for i, ids in enumerate(enc["input_ids"])
    ]


def collate(feats: Sequence[Feature], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """Pad to the longest feature (or ``pad_to``) and stack the targets."""
    length = max(len(f.input_ids) for f in feats)
    if pad_to is not None:
        length = max(length, pad_to)
    ids = torch.full((len(feats), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(feats), length), dtype=torch.long)
    batch: dict[str, Any] = {}
    types = torch.zeros_like(ids)
    for i, f in enumerate(feats):
        ids[i, : len(f.input_ids)] = torch.tensor(f.input_ids)
        mask[i, : len(f.input_ids)] = 1
        if f.token_type_ids is not None:
            types[i, : len(f.token_type_ids)] = torch.tensor(f.token_type_ids)
    batch.update(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if feats[0].labels is not None:
        labels = torch.full_like(ids, -100)
        for i, f in enumerate(feats):
            labels[i, : len(f.labels or [])] = torch.tensor(f.labels or [], dtype=torch.long)
        batch["labels"] = labels
    batch["start"] = torch.tensor([f.start for f in feats])
    batch["end"] = torch.tensor([f.end for f in feats])
    batch["label"] = torch.tensor([f.label for f in feats])
    return batch


# ------------------------------------------------------------------------- QA metrics
PUNCT = {chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")}
PUNCT |= set(string.punctuation)
_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "ar": r"\sال^|ال",
}


def _mixed_segmentation(text: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for ch in text:
        if re.search(r"[\u4e00-\u9fa5]", ch) or ch in PUNCT:
            out.extend(pending.split())
            pending = ""
            out.append(ch)
        else:
            pending += ch
    out.extend(pending.split())
    return out


def normalize_answer(text: str, lang: str | None = None) -> str:
    """Answer normalisation of the official evaluation scripts.

    ``lang=None``: SQuAD v1.1 (lower case, drop ASCII punctuation and English articles,
    squeeze white space), which XTREME uses for TyDi QA Gold Passage. With a language:
    MLQA's script (Unicode punctuation, that language's articles, character segmentation
    of Chinese).
    """
    if lang is None:
        text = text.lower()
        text = "".join(ch for ch in text if ch not in set(string.punctuation))
        text = re.sub(r"\b(a|an|the)\b", " ", text)
        return " ".join(text.split())
    text = "".join(ch for ch in text.lower() if ch not in PUNCT)
    if lang in _ARTICLES:
        text = re.sub(_ARTICLES[lang], " ", text)
    tokens = _mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def qa_f1(prediction: str, gold: str, lang: str | None = None) -> float:
    pred_tokens = normalize_answer(prediction, lang).split()
    gold_tokens = normalize_answer(gold, lang).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_scores(
    examples: Sequence[QAExample], predictions: Sequence[str], lang: str | None = None
) -> dict[str, float]:
    """F1 and EM in percent, each the max over the gold answers, averaged over questions."""
    f1 = em = 0.0
    for ex, pred in zip(examples, predictions, strict=True):
        golds = ex.answers or [""]
        f1 += max(qa_f1(pred, g, lang) for g in golds)
        em += max(float(normalize_answer(pred, lang) == normalize_answer(g, lang)) for g in golds)
    n = max(1, len(examples))
    return {"f1": 100 * f1 / n, "em": 100 * em / n}


def best_spans(
    examples: Sequence[QAExample],
    feats: Sequence[Feature],
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    n_best: int = 20,
    max_answer_tokens: int = 30,
) -> list[str]:
    """The highest-scoring passage span of each example over all of its windows."""
    best: dict[int, tuple[float, str]] = {}
    for i, f in enumerate(feats):
        offsets = f.offsets or []
        s_logit, e_logit = start_logits[i, : len(offsets)], end_logits[i, : len(offsets)]
        starts = torch.topk(s_logit, min(n_best, len(offsets))).indices.tolist()
        ends = torch.topk(e_logit, min(n_best, len(offsets))).indices.tolist()
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s:
                    continue
                if e - s + 1 > max_answer_tokens:
                    continue
                score = float(s_logit[s] + e_logit[e])
                if f.example not in best or score > best[f.example][0]:
                    context = examples[f.example].context
                    text = context[offsets[s][0] : offsets[e][1]]  # type: ignore[index]
                    best[f.example] = (score, text)
    return [best.get(n, (0.0, ""))[1] for n in range(len(examples))]


# ---------------------------------------------------------------------- task clusters
def cluster_into_tasks(
    embeddings: torch.Tensor, num_tasks: int, seed: int, pca_dim: int = 50
) -> list[int]:
    """PCA then a Gaussian mixture: a task id per example (Sec. 4.3, after Aharoni &
    Goldberg, 2020). ``embeddings``: (N, H) pretrained sentence representations."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = embeddings.double().numpy()
    dim = max(1, min(pca_dim, x.shape[0] - 1, x.shape[1]))
    reduced = PCA(n_components=dim, random_state=seed).fit_transform(x)
    gmm = GaussianMixture(
        n_components=num_tasks, covariance_type="full", random_state=seed, reg_covar=1e-4
    )
    return [int(c) for c in gmm.fit(reduced).predict(reduced)]
