"""Full-sentence NER scoring (windows) and the statistics of the results page, on a tiny
word-piece tokenizer built here (no model, nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch

from benchmarks.data import entity_f1
from benchmarks.nlp import quoted as Q
from benchmarks.nlp import report
from benchmarks.nlp import run as R
from benchmarks.nlp import tasks as T
from benchmarks.nlp import write_results as W

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# "kano" is two word pieces, "kanana" three: words of several sub-words
PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "ka", "##no", "##na", "la", "##gos", "ada", "musa",
          "went", "to", "the", "city"]  # fmt: skip
WORDS = ["kano", "kanana", "lagos", "ada", "musa", "went", "to", "the", "city"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(PIECES)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip


def _sentence(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    return [rng.choice(WORDS) for _ in range(n)], [rng.choice(TAGS) for _ in range(n)]


def _old_reading(feat: T.Feature, logits: torch.Tensor, num_words: int) -> list[int | None]:
    """The scoring before issue 17: each word's first position in a truncated feature."""
    out: list[int | None] = [None] * num_words
    for pos, w in enumerate(feat.word_ids or []):
        if w is not None and out[w] is None:
            out[w] = int(logits[pos].argmax())
    return out


def test_window_starts_cover_the_sentence_and_end_at_its_end() -> None:
    assert T.window_starts(5, 8, 4) == [0]
    assert T.window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert T.window_starts(21, 8, 4) == [0, 4, 8, 12, 13]
    for length in range(1, 60):
        starts = T.window_starts(length, 8, 3)
        covered = {i for s in starts for i in range(s, min(s + 8, length))}
        assert covered == set(range(length)) and starts[-1] + 8 >= length


def test_a_short_sentence_gives_the_old_feature_and_the_old_prediction(tokenizer: Any) -> None:
    words, tags = ["musa", "went", "to", "kano", "kanana"], ["B-PER", "O", "O", "B-LOC", "O"]
    (old,) = T.ner_features(tokenizer, [(words, tags)], TAGS, 16)
    (new,) = T.ner_windows(tokenizer, [(words, tags)], TAGS, 16, 8)
    assert (new.input_ids, new.labels, new.word_ids) == (old.input_ids, old.labels, old.word_ids)
    logits = torch.randn(len(old.input_ids), len(TAGS), generator=torch.Generator().manual_seed(0))
    full, truncated = T.window_predictions([new], [logits], [len(words)])
    assert full == truncated == [_old_reading(old, logits, len(words))]


def test_every_word_of_a_long_sentence_gets_a_prediction(tokenizer: Any) -> None:
    rng = random.Random(0)
    sentences = [_sentence(rng, n) for n in (3, 12, 25, 40)]
    window = 10
    old = T.ner_features(tokenizer, sentences, TAGS, window)
    feats = T.ner_windows(tokenizer, sentences, TAGS, window, 4)
    assert all(len(f.input_ids) <= window for f in feats)
    logits = [torch.randn(len(f.input_ids), len(TAGS)) for f in feats]
    first = [next(i for i, f in enumerate(feats) if f.example == n) for n in range(len(sentences))]
    for i, b in zip(first, old, strict=True):  # the first window is the truncated feature
        a = feats[i]
        assert (a.input_ids, a.labels, a.word_ids) == (b.input_ids, b.labels, b.word_ids)
    lengths = [len(words) for words, _ in sentences]
    full, truncated = T.window_predictions(feats, logits, lengths)
    assert all(t is not None for s in full for t in s)
    assert truncated == [_old_reading(feats[i], logits[i], k) for i, k in zip(first, lengths)]
    assert any(t is None for s in truncated for t in s)  # the truncated path loses words


def test_each_word_is_read_from_its_window_of_most_context(tokenizer: Any) -> None:
    """20 one-piece words, windows of 8 words every 4: [0, 8), [4, 12), [8, 16), [12, 20).
    A word's context is its distance to the nearer window edge inside the sentence."""
    words = ["ada"] * 20
    feats = T.ner_windows(tokenizer, [(words, ["O"] * 20)], TAGS, 10, 4)
    assert len(feats) == 4
    # the logits of window k predict tag k everywhere: the prediction names the window
    logits = [
        torch.nn.functional.one_hot(torch.full((10,), k), len(TAGS)).float() for k in range(4)
    ]
    (full,), (truncated,) = T.window_predictions(feats, logits, [20])
    assert full == [0] * 6 + [1] * 4 + [2] * 4 + [3] * 6
    assert truncated == [0] * 8 + [None] * 12


def test_sentence_counts_give_the_same_f1() -> None:
    rng = random.Random(1)
    gold = [_sentence(rng, 8)[1] for _ in range(30)]
    predicted = [_sentence(rng, 8)[1] for _ in range(30)]
    counts = W.parse_counts(R.sentence_counts(gold, predicted))
    c, g, p = counts.sum(axis=0)
    assert counts.shape == (30, 3)
    assert 2 * c / (g + p) == pytest.approx(entity_f1(gold, predicted))


def test_paired_bootstrap_over_sentences() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(200, 3))
    same = W.bootstrap_f1_differences([(a, a)], 500, np.random.default_rng(1))
    assert same.shape == (500,) and np.all(same == 0)
    b = a.copy()
    b[:, 0] = 0  # B finds nothing right: every replicate favours A by A's F1
    diff = W.bootstrap_f1_differences([(a, b), (a, b)], 500, np.random.default_rng(1))
    f1_a = 200 * a[:, 0].sum() / (a[:, 1].sum() + a[:, 2].sum())
    assert np.all(diff > 0) and np.percentile(diff, 2.5) < f1_a < np.percentile(diff, 97.5)


def test_interpolation_at_a_matched_level() -> None:
    dev = [0.0, 50.0, 70.0, 65.0, 80.0]
    assert Q.crossing(dev, 60.0) == (2, 0.5)
    assert Q.crossing(dev, 0.0) == (0, 1.0)
    assert Q.crossing(dev, 81.0) is None
    assert Q.at_crossing([10.0, 20.0, 30.0, 40.0, 50.0], (2, 0.5)) == 25.0
    assert W.seed_interval([1.0]) == "– (one seed)"
    assert W.seed_interval([1.0, 2.0, 3.0]) == "[-0.5, +4.5]"


def test_fill_replaces_only_the_regions(tmp_path: Path) -> None:
    page = "intro\n\n  <!-- results:a -->\n  old\n  <!-- /results:a -->\n\nprose\n"
    filled = W.fill(page, {"a": "| x |\n|---|"})
    assert filled == (
        "intro\n\n  <!-- results:a -->\n\n  | x |\n  |---|\n\n  <!-- /results:a -->\n\nprose\n"
    )
    assert W.fill(filled, {"a": "| x |\n|---|"}) == filled
    with pytest.raises(KeyError, match="'b'"):
        W.fill("<!-- results:b -->\n<!-- /results:b -->", {})


def test_the_committed_page_is_what_the_committed_json_give() -> None:
    """docs/results.md's generated regions are up to date (regenerate with
    ``python -m benchmarks.nlp.write_results``); old JSONs say "bootstrap unavailable"."""
    tables = W.all_tables(W.RESULTS, W.load_groups(W.RESULTS))
    assert "unavailable (no per-sentence counts" in tables["balanced-paired"]
    assert W.main(["--check"]) == 0


def test_report_gives_a_learning_rate_grid_one_row_per_rate(tmp_path: Path) -> None:
    for lr in (3e-4, 1e-4):
        run = {"config": {"method": "mtl", "seed": 100, "lr": lr}, "runs": {}}
        (tmp_path / f"mtl_{lr}.json").write_text(json.dumps(run))
    assert list(report.load(tmp_path)) == ["MTL, lr 1e-4", "MTL, lr 3e-4"]


def test_learning_rate_choice_on_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The campaign's choice and the page's table agree: the best dev F1, ties to the
    smaller rate; the tuning runs are never a reported seed."""
    from benchmarks.nlp import campaign as C

    monkeypatch.setattr(C, "RESULTS", tmp_path)
    (tmp_path / "lr").mkdir()
    best = {"1e-4": 60.0, "3e-4": 70.0, "5e-4": 70.0}
    runs = []
    for lr, dev in best.items():
        curve = [
            {"dev_mean": 0.0, "grad_computations": 0},
            {"dev_mean": dev, "grad_computations": 10},
        ]
        run = {"config": {"method": "mtl", "seed": C.LR_SEED, "lr": float(lr)},
               "runs": {"all": {"curve": curve}}}  # fmt: skip
        C._lr_out("mtl", lr).write_text(json.dumps(run))
        runs.append(run)
    assert C.chosen_lr("mtl") == "3e-4"
    table = W.lr_table(runs)
    assert "| MTL | 3e-4 | 100 | 70.0 | 10 | yes |" in table and table.count("yes") == 1
    assert C.LR_SEED not in C.TUNED_SEEDS
