r"""Task-gradient alignment: the pairwise cosine similarity of the task gradients.

:class:`TaskGradientProbe` measures the paper's Fig. 4, Fig. 7a/b and the heatmap of
Fig. 3h. For tasks :math:`t = 1..T` with losses :math:`L_t` and gradients
:math:`g_t = \nabla_\theta L_t` on the probed parameters,

.. math::
    G_{ij} = \langle g_i, g_j\rangle,\qquad
    \|g_i\| = \sqrt{G_{ii}},\qquad
    C_{ij} = \frac{G_{ij}}{\|g_i\|\,\|g_j\|},\qquad
    \bar c = \frac{1}{T(T-1)}\sum_{i\ne j} C_{ij}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torch_seqreptile._gramian import add_gramian_, gramian
from torch_seqreptile._validation import check_int
from torch_seqreptile.probes._common import seeded_rng, training_flags_kept

__all__ = ["ProbeResult", "TaskGradientProbe"]

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


def _check_finite(squares: Tensor) -> None:
    """Raise naming the first task t whose :math:`\\|g_t\\|^2` (float64) is not finite.

    It is inf or NaN exactly when :math:`g_t` has an inf or NaN entry, or when its squared
    norm overflows float64.
    """
    bad = (~torch.isfinite(squares)).nonzero()
    if bad.numel():
        raise ValueError(f"gradient of losses[{int(bad[0])}] is not finite")


@contextmanager
def _quiet_model(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Forward passes that leave flags, buffers and the global RNG streams as they were."""
    buffers = [] if eval_mode else [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with (
            training_flags_kept(model),
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
        ):
            if eval_mode:
                model.eval()
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


class TaskGradientProbe:
    r"""Pairwise cosine similarity of per-task gradients, exact or sketched.

    Call it with one loss per task (``probe(losses)``), or with one batch per task and a loss
    function (``probe.compute(batches, loss_fn)``). Gradients come from
    :func:`torch.autograd.grad`, so ``.grad`` of every parameter is left as it was.

    **Exact mode** cuts the flattened parameter vector into blocks and accumulates the
    Gramian over their pieces (the part of one parameter that falls in a block),

    .. math::
        G = \sum_b \sum_{q \in b} A_q A_q^\top,\qquad
        A_q = [g_1|_q, \dots, g_T|_q]^\top \in \mathbb{R}^{T\times P_q},

    since an inner product is a sum over coordinates. It holds the T task gradients of one
    block at a time, as autograd returns them (the slice of a parameter that a block
    boundary cuts is copied out, so that parameter's whole gradient is freed), and forms
    each :math:`A_q A_q^\top` with the library's Gramian
    (:func:`torch_seqreptile._gramian.add_gramian_`: float64 products, a bounded chunk at a
    time) without stacking :math:`A_q`. A block holds as many coordinates as fit
    :math:`T \cdot \text{(their bytes)} \le` ``max_memory_bytes`` (at least one); the
    Gramian adds one ``(T, 65536)`` float64 buffer. Each block costs one backward pass per
    task, so with ``B`` blocks the probe runs :math:`B\cdot T` backward passes (and, with
    callables, forward passes).

    **Sketch mode** never holds more than one task gradient: each :math:`g_t` is projected
    to :math:`s_t = S g_t \in \mathbb{R}^m` as soon as it is computed, and the cosines are
    those of the sketches, :math:`\hat C_{ij} = \langle s_i, s_j\rangle / (\|s_i\|\|s_j\|)`.
    :math:`S` is a CountSketch: coordinate :math:`k` gets a uniform draw
    :math:`d_k \in \{0, \dots, 2m-1\}`, which is its bucket :math:`h(k) = d_k \bmod m`
    and its sign :math:`\sigma(k) = +1` if :math:`d_k < m`, else :math:`-1`, so

    .. math::
        (s_t)_j = \sum_{k:\, d_k = j} g_{t,k} - \sum_{k:\, d_k = j + m} g_{t,k}.

    The draws are made once per call, on the CPU, coordinates
    :math:`[c\cdot\text{chunk\_size}, (c+1)\cdot\text{chunk\_size})` of parameter
    :math:`i` from NumPy's PCG64 on ``SeedSequence(seed, spawn_key=(i, c))``, and reused for
    every task: all tasks see the same :math:`S`, which depends only on ``seed``,
    ``chunk_size`` and the parameters' sizes (not on the device). Per task the projection
    is one ``index_add_`` of the gradient into :math:`2m` sums (per chunk, in the gradient's
    precision, float32 at least, added up in float64) and a difference. It is unbiased,
    :math:`\mathbb{E}\langle s_i,s_j\rangle = \langle g_i,g_j\rangle`, with
    :math:`\mathrm{Var} \le (\|g_i\|^2\|g_j\|^2 + \langle g_i,g_j\rangle^2)/m`, so a cosine
    is off by about :math:`(1 - C_{ij}^2)/\sqrt m` (0.011 at the default m = 8192); the
    norms are exact (float64). Memory: one gradient, the draws (4 bytes per probed
    coordinate) and :math:`T\cdot m` float64 numbers. Measured error against exact mode on
    all-MiniLM-L6-v2, and time against exact mode: ``docs/probes.md``.

    Example:
        Two tasks whose gradients are opposite:

        >>> import torch
        >>> from torch_seqreptile.probes import TaskGradientProbe
        >>> layer = torch.nn.Linear(2, 1)
        >>> out = layer(torch.ones(1, 2)).sum()
        >>> result = TaskGradientProbe(layer)([out, -out])
        >>> result.cosine.tolist(), result.mean_cosine
        ([[1.0, -1.0], [-1.0, 1.0]], -1.0)

    Args:
        model: the module whose forward the loss callables run; it is put in eval mode for
            those forward passes (``eval_mode=True``) and its flags are restored.
        params: the parameters to probe (e.g. ``model.bert.encoder``): a module (its
            parameters that require grad) or an iterable of tensors that require grad.
            Default: every trainable parameter of ``model``.
        mode: ``"exact"`` or ``"sketch"``.
        sketch_dim: m, numbers per task in sketch mode (int >= 1).
        seed: seed of the sketch (int >= 0).
        chunk_size: coordinates per random stream in sketch mode (int >= 1); bounds the
            temporary memory of the draws (the projection depends on it).
        max_memory_bytes: exact mode's budget for the stored task gradients of a block (int
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

        Finiteness is checked by the callers on the float64 squared norms they form anyway
        (:func:`_check_finite`), not by a pass over the gradient.

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
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(inputs, grads)]

    def _blocks(self, num_tasks: int) -> list[list[tuple[int, int, int]]]:
        """Pieces ``(parameter index, lo, hi)`` of each block, [lo, hi) a flat slice.

        A block takes coordinates in order while the T task gradients of all of them fit in
        ``max_memory_bytes`` (one coordinate at least); a parameter appears at most once
        in a block.
        """
        if self.max_memory_bytes is None:
            return [[(i, 0, p.numel()) for i, p in enumerate(self.params)]]
        budget = self.max_memory_bytes
        blocks: list[list[tuple[int, int, int]]] = [[]]
        free = budget
        for i, p in enumerate(self.params):
            cost = num_tasks * p.element_size()  # bytes per coordinate, all tasks
            lo = 0
            while lo < p.numel():
                take = min(p.numel() - lo, free // cost)
                if take <= 0 and blocks[-1]:
                    blocks.append([])
                    free = budget
                    continue
                take = max(take, 1)
                blocks[-1].append((i, lo, lo + take))
                free -= take * cost
                lo += take
        return blocks

    def _block_grads(
        self, index: int, loss: TaskLoss, block: list[tuple[int, int, int]]
    ) -> list[Tensor]:
        """One task's gradient on each piece of ``block``: a whole parameter's gradient as
        autograd returns it, a copy of the slice where the block cuts the parameter."""
        grads = self._grads(index, loss, [self.params[i] for i, _, _ in block])
        return [
            g if hi - lo == g.numel() else g.reshape(-1)[lo:hi].clone()
            for g, (_, lo, hi) in zip(grads, block)
        ]

    def _exact(self, losses: Sequence[TaskLoss]) -> ProbeResult:
        num_tasks = len(losses)
        gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=self.params[0].device)
        blocks = self._blocks(num_tasks)
        for block in blocks:
            stored = [self._block_grads(t, loss, block) for t, loss in enumerate(losses)]
            for piece in zip(*stored):  # G += A_q A_q^T
                add_gramian_(gram, piece)
            del stored  # before the next block's gradients, so one block is held at a time
            _check_finite(gram.diagonal())
        gram = gram.cpu()
        cosine = _cosine_from_gram(gram)
        return ProbeResult(
            cosine=cosine,
            norms=gram.diagonal().clamp_min(0).sqrt().clone(),
            mean_cosine=_mean_off_diagonal(cosine),
            mode="exact",
            sketch_dim=None,
            passes=num_tasks * len(blocks),
        )

    def _draws(self) -> list[list[Tensor]]:
        """The CountSketch draws d_k in {0..2m-1}: per parameter, one tensor per chunk."""
        high = 2 * self.sketch_dim
        dtype = np.int32 if high <= 1 << 31 else np.int64
        draws = []
        for i, p in enumerate(self.params):
            chunks = []
            for chunk, lo in enumerate(range(0, p.numel(), self.chunk_size)):
                size = min(self.chunk_size, p.numel() - lo)
                d = seeded_rng(self.seed, i, chunk).integers(high, size=size, dtype=dtype)
                chunks.append(torch.from_numpy(d).to(p.device))
            draws.append(chunks)
        return draws

    def _sketch(self, losses: Sequence[TaskLoss]) -> ProbeResult:
        num_tasks, m = len(losses), self.sketch_dim
        device = self.params[0].device
        draws = self._draws()
        sketches = torch.zeros(num_tasks, m, dtype=torch.float64, device=device)
        squares = torch.zeros(num_tasks, 1, 1, dtype=torch.float64, device=device)
        for t, loss in enumerate(losses):
            for grad, chunks in zip(self._grads(t, loss, self.params), draws):
                flat = grad.reshape(-1)
                add_gramian_(squares[t], [flat])  # ||g_t||^2 += <g, g>, in float64
                dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
                sums = torch.zeros(2 * m, dtype=dtype, device=flat.device)
                for lo, d in zip(range(0, flat.numel(), self.chunk_size), chunks):
                    sums.zero_().index_add_(0, d, flat[lo : lo + d.numel()].to(dtype))
                    sketches[t] += (sums[:m] - sums[m:]).to(device)  # sign: d < m or not
            _check_finite(squares.reshape(-1)[: t + 1])
        norms = squares.reshape(-1).clamp_min(0).sqrt().cpu()
        cosine = _cosine_from_gram(gramian(list(sketches)).cpu())
        cosine[norms == 0, :] = math.nan
        cosine[:, norms == 0] = math.nan
        return ProbeResult(
            cosine=cosine,
            norms=norms,
            mean_cosine=_mean_off_diagonal(cosine),
            mode="sketch",
            sketch_dim=m,
            passes=num_tasks,
        )
