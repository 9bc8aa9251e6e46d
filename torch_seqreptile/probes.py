r"""Probes of what Sequential Reptile changes: task-gradient alignment and forgetting.

* :class:`TaskGradientProbe` — the pairwise cosine similarity of the task gradients
  (the paper's Fig. 4, Fig. 7a/b and the heatmap of Fig. 3h). For tasks
  :math:`t = 1..T` with losses :math:`L_t` and gradients :math:`g_t = \nabla_\theta L_t`
  on the probed parameters,

  .. math::
      G_{ij} = \langle g_i, g_j\rangle,\qquad
      \|g_i\| = \sqrt{G_{ii}},\qquad
      C_{ij} = \frac{G_{ij}}{\|g_i\|\,\|g_j\|},\qquad
      \bar c = \frac{1}{T(T-1)}\sum_{i\ne j} C_{ij}.

* :func:`l2_distance` — :math:`\|\theta - \theta_0\|_2` from the pretrained weights (Fig. 5c, 6c/d).
* :func:`masked_lm_loss` — the masked-language-modelling loss with BERT's 15% masking
  (Fig. 5a/b, 6a/b), for any Hugging Face masked-LM model and tokenizer (duck-typed: this
  module does not import ``transformers``).

None of them touches ``.grad``, the optimizer or the global random number generators, and
each restores the modules' ``training`` flags, so they can run in the middle of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_seqreptile._validation import check_float, check_int

__all__ = [
    "ProbeResult",
    "TaskGradientProbe",
    "l2_distance",
    "masked_lm_loss",
]

TaskLoss = Tensor | Callable[[], Tensor]

_MODES = ("exact", "sketch")


@dataclass(frozen=True)
class ProbeResult:
    """What :class:`TaskGradientProbe` measured for one set of task losses.

    Attributes:
        cosine: ``(T, T)`` float64 matrix :math:`C_{ij}` (ones on the diagonal). A task whose
            gradient is exactly zero has NaN in its row and column.
        norms: ``(T,)`` float64 gradient norms :math:`\\|g_t\\|` (exact in both modes).
        mean_cosine: :math:`\\bar c`, the mean of the off-diagonal entries of ``cosine``
            (NaN entries are left out; NaN if all are).
        mode: ``"exact"`` or ``"sketch"``.
        sketch_dim: m in sketch mode, else ``None``.
        passes: backward passes the probe ran (``T`` times the number of parameter blocks in
            exact mode, ``T`` in sketch mode).
    """

    cosine: Tensor
    norms: Tensor
    mean_cosine: float
    mode: str
    sketch_dim: int | None
    passes: int

    def as_dict(self, prefix: str = "probe/") -> dict[str, float]:
        """Scalars for a logger: the mean cosine and one gradient norm per task."""
        out = {f"{prefix}mean_cosine": self.mean_cosine}
        for task, norm in enumerate(self.norms.tolist()):
            out[f"{prefix}grad_norm/task_{task}"] = float(norm)
        return out


def _mean_off_diagonal(cosine: Tensor) -> float:
    num_tasks = cosine.shape[0]
    off = cosine[~torch.eye(num_tasks, dtype=torch.bool)]
    off = off[~torch.isnan(off)]
    return float(off.mean()) if off.numel() else math.nan


def _cosine_from_gram(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = gram / denom
    cosine[denom == 0] = math.nan
    cosine = cosine.clamp(-1.0, 1.0)  # NaN stays NaN
    diag = cosine.diagonal()
    diag[~torch.isnan(diag)] = 1.0
    return cosine


@contextmanager
def _quiet_model(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Forward passes that leave flags, buffers and the global RNG streams as they were."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [] if eval_mode else [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if eval_mode:
                model.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


class TaskGradientProbe:
    r"""Pairwise cosine similarity of per-task gradients, exact or sketched.

    Call it with one loss per task (``probe(losses)``), or with one batch per task and a loss
    function (``probe.compute(batches, loss_fn)``). Gradients come from
    :func:`torch.autograd.grad`, so ``.grad`` of every parameter is left as it was.

    **Exact mode** stores the per-task gradients of one block of parameters at a time, as a
    ``(T, P_b)`` matrix :math:`A_b`, and accumulates the Gramian over the blocks,
    :math:`G = \sum_b A_b A_b^\top` (an inner product is a sum over coordinates). Blocks are
    cut in the flattened parameter vector so that :math:`T\cdot P_b` elements fit in
    ``max_memory_bytes``; each block costs one backward pass per task, so with ``B`` blocks
    the probe runs :math:`B\cdot T` backward passes (and, with callables, forward passes).

    **Sketch mode** never holds more than one task gradient: each :math:`g_t` is projected
    to :math:`s_t = S g_t \in \mathbb{R}^m` as soon as it is computed, and the cosines are
    those of the sketches, :math:`\hat C_{ij} = \langle s_i, s_j\rangle / (\|s_i\|\|s_j\|)`.
    :math:`S` is a seeded sparse random projection (CountSketch): coordinate :math:`k` goes
    to bucket :math:`h(k)\in\{1..m\}` with sign :math:`\sigma(k)=\pm1`, drawn chunk by chunk
    (``chunk_size`` coordinates) from a generator seeded with ``seed``, the parameter's
    position and the chunk, so all tasks see the same :math:`S`. It is unbiased,
    :math:`\mathbb{E}\langle s_i,s_j\rangle = \langle g_i,g_j\rangle`, with
    :math:`\mathrm{Var} \le (\|g_i\|^2\|g_j\|^2 + \langle g_i,g_j\rangle^2)/m`, so a cosine
    is off by about :math:`(1 - C_{ij}^2)/\sqrt m` (0.011 at the default m = 8192); the
    norms are exact. Work is O(P) per task, independent of m. Measured error against exact
    mode on all-MiniLM-L6-v2: ``docs/probes.md``.

    Args:
        model: the module whose forward the loss callables run; it is put in eval mode for
            those forward passes (``eval_mode=True``) and its flags are restored.
        params: the parameters to probe (e.g. ``model.bert.encoder``): a module (its
            parameters that require grad) or an iterable of tensors that require grad.
            Default: every trainable parameter of ``model``.
        mode: ``"exact"`` or ``"sketch"``.
        sketch_dim: m, numbers per task in sketch mode (int >= 1).
        seed: seed of the sketch (int >= 0).
        chunk_size: coordinates per random draw in sketch mode (int >= 1); bounds the
            temporary memory of the projection.
        max_memory_bytes: exact mode's budget for the stored block of task gradients (int
            >= 1) or ``None`` for a single block. Default 1 GiB.
        eval_mode: run loss callables with ``model.eval()`` (no dropout). With ``False``
            the modules keep their flags and any buffers they update are restored.

    Loss callables run under :func:`torch.random.fork_rng`, so dropout in ``eval_mode=False``
    does not advance the training run's random stream. Pass the unwrapped module, not a
    ``DistributedDataParallel`` wrapper.
    """

    def __init__(
        self,
        model: nn.Module,
        params: nn.Module | Iterable[Tensor] | None = None,
        *,
        mode: str = "exact",
        sketch_dim: int = 8192,
        seed: int = 0,
        chunk_size: int = 1 << 20,
        max_memory_bytes: int | None = 1 << 30,
        eval_mode: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.sketch_dim = check_int("sketch_dim", sketch_dim, 1)
        self.seed = check_int("seed", seed, 0)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.max_memory_bytes = (
            None if max_memory_bytes is None else check_int("max_memory_bytes", max_memory_bytes, 1)
        )
        self.eval_mode = bool(eval_mode)
        self.params = self._resolve_params(model, params)
        self.numel = sum(p.numel() for p in self.params)

    @staticmethod
    def _resolve_params(
        model: nn.Module, params: nn.Module | Iterable[Tensor] | None
    ) -> list[Tensor]:
        if params is None:
            candidates: list[Any] = [p for p in model.parameters() if p.requires_grad]
        elif isinstance(params, nn.Module):
            candidates = [p for p in params.parameters() if p.requires_grad]
        elif isinstance(params, Tensor):
            candidates = [params]
        else:
            candidates = list(params)
        chosen: list[Tensor] = []
        seen: set[int] = set()
        for i, p in enumerate(candidates):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) must require grad")
            if id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
        if not chosen:
            raise ValueError("params must hold at least one parameter that requires grad")
        return chosen

    # ------------------------------------------------------------------ public API
    def compute(
        self, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
    ) -> ProbeResult:
        """Probe with one batch per task: task t's loss is ``loss_fn(model, batches[t])``."""
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
            raise TypeError(
                f"batches must be a sequence (one batch per task), got {type(batches).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        model = self.model

        def closure(batch: Any) -> Callable[[], Tensor]:
            return lambda: loss_fn(model, batch)

        return self([closure(b) for b in batches])

    def __call__(self, losses: Sequence[TaskLoss]) -> ProbeResult:
        """Probe with one loss per task: scalar tensors with a graph, or zero-arg callables.

        The graphs of tensor losses are retained (they are freed when you drop the tensors,
        and you may still call ``backward`` on them). Callables are run one at a time (one
        graph in memory), once per task and parameter block.
        """
        if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(
                f"losses must be a sequence (one loss per task), got {type(losses).__name__}"
            )
        if len(losses) < 2:
            raise ValueError(
                f"losses must hold one loss per task, at least 2 tasks, got {len(losses)}"
            )
        for i, loss in enumerate(losses):
            if isinstance(loss, Tensor):
                if loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError(
                        f"losses[{i}] must be a scalar tensor that requires grad, got shape "
                        f"{tuple(loss.shape)} (requires_grad={loss.requires_grad})"
                    )
            elif not callable(loss):
                raise TypeError(
                    f"losses[{i}] must be a Tensor or a callable, got {type(loss).__name__}"
                )
        if self.mode == "exact":
            return self._exact(losses)
        return self._sketch(losses)

    # ------------------------------------------------------------------ internals
    def _grads(self, index: int, loss: TaskLoss, inputs: list[Tensor]) -> list[Tensor]:
        """Gradient of one task's loss w.r.t. ``inputs`` (zeros where unused); .grad untouched.

        A tensor loss keeps its graph (it is the caller's: they may still call ``backward``);
        a callable's graph is freed at once.
        """
        if isinstance(loss, Tensor):
            grads = torch.autograd.grad(
                loss.reshape(()), inputs, retain_graph=True, allow_unused=True
            )
        else:
            with _quiet_model(self.model, self.eval_mode):
                value = loss()
                if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
                    raise ValueError(
                        f"losses[{index}]() must return a scalar tensor that requires grad"
                    )
                grads = torch.autograd.grad(value.reshape(()), inputs, allow_unused=True)
        out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(inputs, grads)]
        for g in out:
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradient of losses[{index}] is not finite")
        return out

    def _storage_dtype(self) -> torch.dtype:
        return (
            torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        )

    def _blocks(self, num_tasks: int) -> list[tuple[int, int]]:
        """Flat ranges [lo, hi) of the parameter vector holding T·(hi-lo) elements each."""
        if self.max_memory_bytes is None:
            return [(0, self.numel)]
        itemsize = torch.empty((), dtype=self._storage_dtype()).element_size()
        per_block = max(1, self.max_memory_bytes // (num_tasks * itemsize))
        return [(lo, min(lo + per_block, self.numel)) for lo in range(0, self.numel, per_block)]

    def _exact(self, losses: Sequence[TaskLoss]) -> ProbeResult:
        num_tasks = len(losses)
        dtype = self._storage_dtype()
        device = self.params[0].device
        gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        blocks = self._blocks(num_tasks)
        passes = 0
        for lo, hi in blocks:
            # Parameters overlapping [lo, hi) and the slice of each that falls inside it.
            pieces = [
                (p, max(lo, start) - start, min(hi, end) - start, max(lo, start) - lo)
                for p, start, end in zip(self.params, offsets, offsets[1:])
                if start < hi and end > lo
            ]
            inputs = [p for p, *_ in pieces]
            rows = torch.empty(num_tasks, hi - lo, dtype=dtype, device=device)
            for t, loss in enumerate(losses):
                grads = self._grads(t, loss, inputs)
                passes += 1
                for (_, a, b, at), g in zip(pieces, grads):
                    rows[t, at : at + b - a].copy_(g.reshape(-1)[a:b])
                del grads
            for c in range(0, hi - lo, 1 << 16):  # G += A_b A_bᵀ, accumulated in float64
                part = rows[:, c : c + (1 << 16)].to(torch.float64)
                gram += part @ part.T
            del rows
        gram = gram.cpu()
        cosine = _cosine_from_gram(gram)
        return ProbeResult(
            cosine=cosine,
            norms=gram.diagonal().clamp_min(0).sqrt().clone(),
            mean_cosine=_mean_off_diagonal(cosine),
            mode="exact",
            sketch_dim=None,
            passes=passes,
        )

    def _chunk_seed(self, param_index: int, chunk: int) -> int:
        return (self.seed * 1_000_003 + param_index * 65_537 + chunk * 257 + 12_345) % (1 << 62)

    def _sketch_one(self, grads: list[Tensor]) -> Tensor:
        """s = S g with S the seeded CountSketch of m rows, drawn chunk by chunk."""
        m = self.sketch_dim
        device = grads[0].device
        sketch = torch.zeros(m, dtype=torch.float64, device=device)
        generator = torch.Generator(device=device)
        for param_index, grad in enumerate(grads):
            flat = grad.reshape(-1)
            for chunk, lo in enumerate(range(0, flat.numel(), self.chunk_size)):
                piece = flat[lo : lo + self.chunk_size].to(torch.float64)
                generator.manual_seed(self._chunk_seed(param_index, chunk))
                draw = torch.randint(0, 2 * m, (piece.numel(),), generator=generator, device=device)
                signed = torch.where(draw < m, piece, -piece)  # sigma(k) = ±1
                sketch.index_add_(0, draw % m, signed)  # bucket h(k)
        return sketch

    def _sketch(self, losses: Sequence[TaskLoss]) -> ProbeResult:
        num_tasks = len(losses)
        sketches = []
        norms = torch.zeros(num_tasks, dtype=torch.float64)
        for t, loss in enumerate(losses):
            grads = self._grads(t, loss, self.params)
            norms[t] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            sketches.append(self._sketch_one(grads))
            del grads
        stacked = torch.stack(sketches).cpu()
        cosine = _cosine_from_gram(stacked @ stacked.T)
        cosine[norms == 0, :] = math.nan
        cosine[:, norms == 0] = math.nan
        return ProbeResult(
            cosine=cosine,
            norms=norms,
            mean_cosine=_mean_off_diagonal(cosine),
            mode="sketch",
            sketch_dim=self.sketch_dim,
            passes=num_tasks,
        )


# ---------------------------------------------------------------------- forgetting probes
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
    ids: list[int],
    special: list[int],
    *,
    mask_prob: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[list[int], list[int]]:
    """BERT's masking of one sequence: returns (inputs, labels with -100 where not scored)."""
    length = len(ids)
    eligible = torch.tensor([s == 0 for s in special], dtype=torch.bool)
    chosen = (torch.rand(length, generator=generator) < mask_prob) & eligible
    if not bool(chosen.any()) and bool(eligible.any()):
        # Score at least one token so that every sentence counts.
        candidates = eligible.nonzero().flatten()
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        chosen[pick] = True
    action = torch.rand(length, generator=generator)  # 80% [MASK], 10% random, 10% kept
    random_tokens = torch.randint(vocab_size, (length,), generator=generator)
    inputs = torch.tensor(ids)
    labels = torch.full((length,), -100, dtype=torch.long)
    labels[chosen] = inputs[chosen]
    inputs = torch.where(chosen & (action < 0.8), torch.tensor(mask_token_id), inputs)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
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

    The masks of sentence n are drawn from a generator seeded with ``(seed, n)``, so the
    result does not depend on ``batch_size`` or on other sentences. Runs in eval mode under
    ``torch.no_grad()`` and restores the modules' flags; the global RNG is not used.

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
    flags = [(module, module.training) for module in model.modules()]
    total, count = 0.0, 0
    generator = torch.Generator()
    try:
        model.eval()
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encoded = tokenizer(
                chunk, truncation=True, max_length=max_length, return_special_tokens_mask=True
            )
            rows, labels = [], []
            for offset, (ids, special) in enumerate(
                zip(encoded["input_ids"], encoded["special_tokens_mask"])
            ):
                generator.manual_seed(seed * 1_000_003 + start + offset)
                row, label = _bert_mask(
                    list(ids),
                    list(special),
                    mask_prob=mask_prob,
                    mask_token_id=mask_token_id,
                    vocab_size=vocab_size,
                    generator=generator,
                )
                rows.append(row)
                labels.append(label)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.full((len(rows), width), -100, dtype=torch.long)
            for n, (row, label) in enumerate(zip(rows, labels)):
                input_ids[n, : len(row)] = torch.tensor(row)
                attention[n, : len(row)] = 1
                target[n, : len(label)] = torch.tensor(label)
            with torch.no_grad():
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
    finally:
        for module, training in flags:
            module.training = training
    if count == 0:
        raise ValueError("texts yielded no maskable token (all special or empty)")
    return total / count
