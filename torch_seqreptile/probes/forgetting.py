r"""Forgetting probes: distance from the pretrained weights and masked-LM loss (Fig. 5, 6)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torch_seqreptile._validation import check_float, check_int
from torch_seqreptile.probes._common import seeded_rng, training_flags_kept

__all__ = ["l2_distance", "masked_lm_loss"]


def _named_tensors(obj: nn.Module | Mapping[str, Tensor], argument: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.named_parameters())
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(
        f"{argument} must be an nn.Module or a mapping of names to tensors, "
        f"got {type(obj).__name__}"
    )


@torch.no_grad()
def l2_distance(
    model: nn.Module | Mapping[str, Tensor],
    reference: nn.Module | Mapping[str, Tensor],
    *,
    strict: bool = True,
) -> float:
    r"""Euclidean distance from the reference weights (Fig. 5c, 6c/d).

    .. math::
        \|\theta - \theta_0\|_2 = \sqrt{\textstyle\sum_k (\theta_k - \theta_{0,k})^2}

    The paper's measure of how far fine-tuning moved the model from the pretrained weights
    (Fig. 5c, 6c/d). Computed in float64 over the parameters of ``model`` (a module, whose
    ``named_parameters`` are used, or a ``state_dict``-like mapping), matched by name in
    ``reference`` (a module or a mapping, e.g. a snapshot taken before training). Pass
    submodules (``model.bert``, ``pretrained.bert``) to compare a shared encoder only. For
    :class:`~torch_seqreptile.SeqReptile`, call it inside ``with opt.slow_weights():`` to
    measure phi.

    Args:
        strict: every parameter of ``model`` must be in ``reference`` (``ValueError`` naming
            the first missing one). With ``False`` only the names both hold are compared.

    >>> import copy, torch
    >>> from torch_seqreptile.probes import l2_distance
    >>> model = torch.nn.Linear(2, 2)
    >>> before = copy.deepcopy(model.state_dict())
    >>> with torch.no_grad():
    ...     model.weight += torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    >>> round(l2_distance(model, before), 6)  # the float32 weights round the 3 and 4
    5.0
    """
    ours = _named_tensors(model, "model")
    theirs = _named_tensors(reference, "reference")
    names = [n for n in ours if n in theirs]
    if strict:
        missing = [n for n in ours if n not in theirs]
        if missing:
            raise ValueError(
                f"reference lacks {len(missing)} parameter(s) of model, e.g. {missing[0]!r}; "
                "pass matching modules or strict=False"
            )
    if not names:
        raise ValueError("model and reference have no parameter name in common")
    total = 0.0
    for name in names:
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(a.shape)} in model, "
                f"{tuple(b.shape)} in reference"
            )
        total += float((a.double() - b.to(a.device).double()).pow(2).sum())
    return math.sqrt(total)


def _bert_mask(
    ids: Sequence[int],
    special: Sequence[int],
    *,
    mask_prob: float,
    mask_token_id: int,
    vocab_size: int,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """BERT's masking of one sequence: returns (inputs, labels with -100 where not scored)."""
    tokens = np.asarray(ids, dtype=np.int64)
    eligible = np.asarray(special) == 0
    chosen = (rng.random(len(tokens)) < mask_prob) & eligible
    if not chosen.any() and eligible.any():
        chosen[rng.choice(np.flatnonzero(eligible))] = True  # every sentence is scored
    action = rng.random(len(tokens))  # 80% [MASK], 10% random token, 10% kept
    random_tokens = rng.integers(vocab_size, size=len(tokens))
    labels = np.where(chosen, tokens, -100)
    inputs = np.where(chosen & (action < 0.8), mask_token_id, tokens)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs.tolist(), labels.tolist()


def masked_lm_loss(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 32,
    max_length: int = 128,
) -> float:
    r"""Mean masked-language-modelling loss of ``model`` on ``texts`` (Fig. 5a/b, 6a/b).

    Masking follows BERT (Devlin et al., 2019): each non-special token is chosen with
    probability ``mask_prob``; a chosen token is replaced by the mask token with probability
    0.8, by a uniformly random token with probability 0.1 and kept with probability 0.1.
    A sentence with no chosen token gets one (chosen uniformly), so every sentence is scored.
    The result is the token-weighted mean over all chosen tokens :math:`\mathcal M`,

    .. math::
        \mathcal L_{\mathrm{MLM}} = -\frac{1}{|\mathcal M|}\sum_{(n,k)\in\mathcal M}
        \log p_\theta\big(x_{n,k} \mid \tilde x_n\big).

    The masks of sentence n (its position in ``texts``) are drawn from NumPy's PCG64 on
    ``numpy.random.SeedSequence(seed, spawn_key=(n,))``, an independent stream per
    sentence, so the result does not depend on ``batch_size`` or on other sentences. Runs
    in eval mode under ``torch.no_grad()`` and restores the modules' flags; the global
    torch and NumPy generators are not used.

    Args:
        model: a Hugging Face masked-LM model (``...ForMaskedLM``) or any module called as
            ``model(input_ids=..., attention_mask=...)`` returning logits (``.logits`` or the
            first element) of shape ``(batch, length, vocab)``.
        tokenizer: its tokenizer (called with ``return_special_tokens_mask=True``; must have
            ``mask_token_id``).
        texts: the sentences (at least one).
        mask_prob: in (0, 1]. seed: int >= 0. batch_size, max_length: ints >= 1.
    """
    mask_prob = check_float("mask_prob", mask_prob, 0.0, 1.0, open_high=False)
    if mask_prob == 0.0:
        raise ValueError("mask_prob must be in (0, 1], got 0.0")
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 1)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings")
    mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("tokenizer must define mask_token_id (a masked-LM tokenizer)")
    vocab_size = len(tokenizer)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with training_flags_kept(model), torch.no_grad():
        model.eval()
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                max_length=max_length,
                return_special_tokens_mask=True,
            )
            rows, labels = [], []
            for n, (ids, special) in enumerate(
                zip(encoded["input_ids"], encoded["special_tokens_mask"]), start
            ):
                row, label = _bert_mask(
                    ids,
                    special,
                    mask_prob=mask_prob,
                    mask_token_id=mask_token_id,
                    vocab_size=vocab_size,
                    rng=seeded_rng(seed, n),
                )
                rows.append(row)
                labels.append(label)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.full((len(rows), width), -100, dtype=torch.long)
            for k, (row, label) in enumerate(zip(rows, labels)):
                input_ids[k, : len(row)] = torch.tensor(row)
                attention[k, : len(row)] = 1
                target[k, : len(label)] = torch.tensor(label)
            output = model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            logits = output.logits if hasattr(output, "logits") else output[0]
            target = target.to(logits.device)
            total += float(
                nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((target != -100).sum())
    if count == 0:
        raise ValueError("texts yielded no maskable token (all special or empty)")
    return total / count
