"""TaskGradientProbe against a direct computation, the sketch's error bound, and forgetting probes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import batch, make_model
from torch_seqreptile.probes import TaskGradientProbe, l2_distance, masked_lm_loss
from torch_seqreptile.probes.forgetting import _bert_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def task_losses(model: nn.Module, num_tasks: int = 3) -> list[torch.Tensor]:
    losses = []
    for t in range(num_tasks):
        x, y, _ = batch(t)
        losses.append((model(x, t) - y - t).pow(2).mean())
    return losses


def direct(
    losses: list[torch.Tensor], params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten each task's gradient, then cosine and norm: the obvious reference."""
    flat = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads)
                ]
            )
        )
    g = torch.stack(flat).double()
    norms = g.norm(dim=1)
    return (g @ g.T) / (norms[:, None] * norms[None, :]), norms


def mean_off(c: torch.Tensor) -> float:
    t = c.shape[0]
    return float(c[~torch.eye(t, dtype=torch.bool)].mean())


@pytest.mark.parametrize("which", ["all", "trunk"])
@pytest.mark.parametrize("as_callables", [False, True])
def test_exact_matches_direct_computation(which: str, as_callables: bool) -> None:
    model = make_model(0)
    params = list(model.trunk.parameters()) if which == "trunk" else [p for p in model.parameters()]
    ref_cos, ref_norms = direct(task_losses(model), params)
    probe = TaskGradientProbe(model, model.trunk if which == "trunk" else None)
    if as_callables:
        losses = [lambda t=t: task_losses(model)[t] for t in range(3)]
        result = probe(losses)
    else:
        result = probe(task_losses(model))
    torch.testing.assert_close(result.cosine, ref_cos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-12, atol=1e-12)
    assert result.mean_cosine == pytest.approx(mean_off(ref_cos), abs=1e-12)
    assert result.mode == "exact" and result.passes == 3


def test_exact_blocks_split_parameters_and_agree() -> None:
    """A tiny memory budget cuts the flat vector (and single parameters) into many blocks."""
    model = make_model(1)
    whole = TaskGradientProbe(model, max_memory_bytes=None)(task_losses(model))
    # 3 tasks x 8 bytes x 10 elements per block: parameters of 40/64 elements get split.
    blocked = TaskGradientProbe(model, max_memory_bytes=3 * 8 * 10)(task_losses(model))
    numel = sum(p.numel() for p in model.parameters())
    assert blocked.passes == 3 * math.ceil(numel / 10)
    torch.testing.assert_close(blocked.cosine, whole.cosine, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.norms, whole.norms, rtol=1e-12, atol=1e-12)


def test_compute_with_batches_and_loss_fn() -> None:
    model = make_model(2)
    batches = [(batch(t)[0], batch(t)[1] + t, t) for t in range(3)]

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        return (m(b[0], b[2]) - b[1]).pow(2).mean()

    result = TaskGradientProbe(model, model.trunk).compute(batches, loss_fn)
    ref_cos, _ = direct([loss_fn(model, b) for b in batches], list(model.trunk.parameters()))
    torch.testing.assert_close(result.cosine, ref_cos, rtol=1e-12, atol=1e-12)


class Dot(nn.Module):
    """loss_t = <w, v_t>, so the task gradients are exactly the vectors v_t."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))
        self.b = nn.Parameter(torch.zeros(7, 3))


def correlated_vectors(num_tasks: int, numel: int, rho: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(numel, generator=g)
    # heavy-tailed scales, as gradients of real networks have
    scale = torch.exp(1.5 * torch.randn(numel, generator=g))
    own = torch.randn(num_tasks, numel, generator=g)
    return scale * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * own)


def test_sketch_error_within_documented_bound() -> None:
    """Seeded example: default m, 6 tasks, 200k coordinates, several sketch seeds.

    Documented: each cosine is off by about (1 - C^2)/sqrt(m) (standard deviation), and the
    mean pairwise cosine by at most 0.03 at the default m.
    """
    num_tasks, numel = 6, 200_000
    vectors = correlated_vectors(num_tasks, numel, rho=0.3, seed=0)
    model = Dot(numel)
    losses = [(lambda v=v: (model.w * v).sum()) for v in vectors]
    exact = TaskGradientProbe(model, [model.w])(losses)
    m = TaskGradientProbe(model).sketch_dim
    assert m == 8192
    off = ~torch.eye(num_tasks, dtype=torch.bool)
    for seed in range(3):
        sketch = TaskGradientProbe(model, [model.w], mode="sketch", seed=seed, chunk_size=30_000)(
            losses
        )
        assert sketch.sketch_dim == m and sketch.passes == num_tasks
        assert abs(sketch.mean_cosine - exact.mean_cosine) <= 0.03
        sd = (1 - exact.cosine[off] ** 2) / math.sqrt(m)
        assert bool(((sketch.cosine - exact.cosine)[off].abs() <= 4 * sd).all())
        torch.testing.assert_close(sketch.norms, exact.norms, rtol=1e-10, atol=0)  # exact norms
        assert torch.equal(sketch.cosine.diagonal(), torch.ones(num_tasks, dtype=torch.float64))


class Linear2(nn.Module):
    """loss_t = <w, u_t> + <v, z_t>: two parameters, gradients exactly (u_t, z_t)."""

    def __init__(self, sizes: tuple[int, int], dtypes: tuple[torch.dtype, torch.dtype]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(sizes[0], dtype=dtypes[0]))
        self.v = nn.Parameter(torch.zeros(sizes[1], dtype=dtypes[1]))


def linear_losses(
    model: Linear2, grads: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[Callable[[], torch.Tensor]]:
    return [lambda u=u, z=z: (model.w * u).sum() + (model.v * z).sum() for u, z in grads]


def test_sketch_is_unbiased_over_seeds() -> None:
    """The mean over sketch seeds of each sketched cosine is the exact cosine.

    m = 32, so one run is off by about (1 - C^2)/sqrt(32), up to 0.18; the mean of 300 seeds
    by about 0.01 (plus the ratio estimator's O(1/m) bias). The vectors are built so that
    a flawed CountSketch would be biased: task 0 is (a, b) and task 1 is (b, a) chunk-wise,
    with a and b independent, so their cosine is about 0, while a sketch that hashed both
    chunks (or parameters) alike would give 1; tasks 2 and 3 have a mean of 1/2 per
    coordinate, which a sketch without random signs would add up across coordinates.
    """
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(400, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.exp(torch.randn(400, generator=g, dtype=torch.float64))
    model = Linear2((800, 400), (torch.float64, torch.float64))
    grads = [
        (torch.cat([a, b]), c),
        (torch.cat([b, a]), c * scale),
        (torch.cat([a + c, -b]) + 0.5, a - c + 0.5),
        (torch.cat([c, b]) + 0.5, a * scale + 0.5),
    ]
    losses = linear_losses(model, grads)
    exact = TaskGradientProbe(model)(losses).cosine
    runs = torch.stack(
        [
            TaskGradientProbe(model, mode="sketch", sketch_dim=32, seed=s, chunk_size=400)(
                losses
            ).cosine
            for s in range(300)
        ]
    )
    assert float(runs.std(dim=0).max()) > 0.05  # the seeds do give different projections
    torch.testing.assert_close(runs.mean(dim=0), exact, rtol=0, atol=0.05)


def test_sketch_is_reproducible_and_one_projection_for_all_tasks() -> None:
    g = torch.Generator().manual_seed(1)
    model = Linear2((3000, 500), (torch.float32, torch.float64))
    u, z = torch.randn(3000, generator=g), torch.randn(500, generator=g, dtype=torch.float64)
    other = (torch.randn(3000, generator=g), torch.randn(500, generator=g, dtype=torch.float64))
    # the same gradient twice, scaled, negated, and an unrelated one
    losses = linear_losses(model, [(u, z), (u, z), (2 * u, 2 * z), (-u, -z), other])

    def sketch(seed: int) -> torch.Tensor:
        probe = TaskGradientProbe(model, mode="sketch", sketch_dim=64, seed=seed, chunk_size=700)
        return probe(losses).cosine

    first = sketch(5)
    assert torch.equal(first, sketch(5))  # same seed, new probe, new call: same numbers
    assert not torch.equal(first, sketch(6))
    # same S for every task: the sketches of g, g, 2g and -g are collinear
    torch.testing.assert_close(first[:4, :4].abs(), torch.ones(4, 4, dtype=torch.float64))
    assert float(first[0, 3]) == pytest.approx(-1.0)
    assert abs(float(first[0, 4])) < 0.9


def test_exact_equals_float64_gramian_of_flat_gradients_in_blocks() -> None:
    """float32 and float64 parameters, a budget that cuts both: G = F F^T in float64.

    T = 2 tasks: a budget of 128 bytes holds both tasks' gradients on 16 float32 or 8
    float64 coordinates, so w (40 float32) is cut into 16 + 16 + 8 coordinates, the third
    block (64 bytes used) takes 4 of v's 10 float64 coordinates and a fourth block the
    other 6: 4 blocks, 8 backward passes.
    """
    g = torch.Generator().manual_seed(2)
    model = Linear2((40, 10), (torch.float32, torch.float64))
    grads = [
        (torch.randn(40, generator=g) * 1e3, torch.randn(10, generator=g, dtype=torch.float64))
        for _ in range(2)
    ]
    flat = torch.stack([torch.cat([u.double(), z]) for u, z in grads])
    reference = flat @ flat.T
    for budget, blocks in [(None, 1), (128, 4)]:
        result = TaskGradientProbe(model, max_memory_bytes=budget)(linear_losses(model, grads))
        assert result.passes == 2 * blocks
        gram = result.cosine * result.norms[:, None] * result.norms[None, :]
        torch.testing.assert_close(result.norms**2, reference.diagonal(), rtol=1e-12, atol=0)
        torch.testing.assert_close(gram, reference, rtol=1e-12, atol=0)


def test_exact_blocks_of_any_budget_give_the_same_gramian() -> None:
    """Many parameters and tasks, budgets from one coordinate to all: same Gramian."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    xs = [torch.randn(4, 7) for _ in range(4)]
    losses = [lambda x=x: model(x).square().sum() for x in xs]
    params = list(model.parameters())
    flat = torch.stack(
        [torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(f(), params)]) for f in losses]
    ).double()
    reference = flat @ flat.T
    numel = flat.shape[1]
    for per_block in (1, 6, 35, numel):
        result = TaskGradientProbe(model, max_memory_bytes=4 * 4 * per_block)(losses)
        assert result.passes == 4 * math.ceil(numel / per_block)
        gram = result.cosine * result.norms[:, None] * result.norms[None, :]
        torch.testing.assert_close(gram, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_probe_restores_mixed_flags_also_on_error(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Sequential(nn.Linear(6, 1)))
    model.train()
    model[1].eval()
    model[2][0].eval()
    flags = [m.training for m in model.modules()]
    x = torch.randn(8, 4)
    seen: list[bool] = []

    def loss(t: int) -> torch.Tensor:
        seen.append(model[0].training)
        return (model(x + t) ** 2).mean()

    def broken() -> torch.Tensor:
        raise RuntimeError("loss failed")

    probe = TaskGradientProbe(model, mode=mode, sketch_dim=16)
    probe([lambda: loss(0), lambda: loss(1)])
    assert seen == [False, False]  # eval mode inside the probe
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(RuntimeError, match="loss failed"):
        probe([lambda: loss(0), broken])
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_tensor_losses_leave_grad_and_graph_usable(mode: str) -> None:
    model = make_model(0)
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    before = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    losses = task_losses(model)
    TaskGradientProbe(model, mode=mode, sketch_dim=64, max_memory_bytes=3 * 8 * 50)(losses)
    for p, (obj, value) in zip(params, before):
        assert p.grad is obj
        assert value is None or torch.equal(p.grad, value)
    losses[0].backward()  # the caller's graph is still there


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_probe_alone_leaves_state_identical(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 1)
    ).double()
    model.train()
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    before = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    buffers = [b.clone() for b in model.buffers()]
    weights = [p.detach().clone() for p in params]
    x = torch.randn(8, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    for eval_mode in (True, False):
        probe = TaskGradientProbe(model, mode=mode, sketch_dim=64, eval_mode=eval_mode)
        probe([lambda t=t: (model(x + t) ** 2).mean() for t in range(3)])
        for p, (obj, value) in zip(params, before):
            assert p.grad is obj
            assert value is None or torch.equal(p.grad, value)
        assert all(m.training for m in model.modules())
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))
        assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_eval_mode_false_uses_dropout_but_restores_rng() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 1)).double().train()
    x = torch.randn(8, 4, dtype=torch.float64)
    losses = [lambda t=t: (model(x * (t + 1)) ** 2).mean() for t in range(2)]
    a = TaskGradientProbe(model, eval_mode=False)(losses)
    b = TaskGradientProbe(model, eval_mode=False)(losses)
    c = TaskGradientProbe(model, eval_mode=True)(losses)
    assert torch.equal(a.cosine, b.cosine)  # forked RNG: same dropout masks each time
    assert not torch.allclose(a.norms, c.norms)


def test_zero_gradient_task_gives_nan_row() -> None:
    model = make_model(0)
    losses = task_losses(model)
    losses.append(model.unused.sum() * 0.0)
    for mode in ("exact", "sketch"):
        result = TaskGradientProbe(model, mode=mode, sketch_dim=512)(losses)
        assert bool(torch.isnan(result.cosine[3]).all()) and bool(
            torch.isnan(result.cosine[:, 3]).all()
        )
        assert result.norms[3] == 0
        assert math.isfinite(result.mean_cosine)
    d = result.as_dict()
    assert set(d) == {"probe/mean_cosine", *(f"probe/grad_norm/task_{t}" for t in range(4))}


def test_probe_argument_errors() -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match="mode"):
        TaskGradientProbe(model, mode="fast")
    with pytest.raises(ValueError, match="sketch_dim"):
        TaskGradientProbe(model, mode="sketch", sketch_dim=0)
    with pytest.raises(ValueError, match="max_memory_bytes"):
        TaskGradientProbe(model, max_memory_bytes=0)
    with pytest.raises(TypeError, match="model"):
        TaskGradientProbe("model")  # type: ignore[arg-type]
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        TaskGradientProbe(model, [frozen])
    probe = TaskGradientProbe(model)
    with pytest.raises(ValueError, match="at least 2"):
        probe(task_losses(model)[:1])
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        probe([task_losses(model)[0], torch.ones(3, requires_grad=True)])
    with pytest.raises(TypeError, match=r"losses\[1\]"):
        probe([task_losses(model)[0], 3.0])  # type: ignore[list-item]
    bad = task_losses(model)
    bad[2] = bad[2] * float("inf")
    with pytest.raises(ValueError, match="not finite"):
        probe(bad)


# ---------------------------------------------------------------------- forgetting probes
def test_l2_distance_matches_direct() -> None:
    a, b = make_model(0), make_model(1)
    expected = math.sqrt(
        sum(float((p - q).detach().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    )
    assert l2_distance(a, b) == pytest.approx(expected, rel=1e-12)
    snapshot = {k: v.detach().clone() for k, v in b.named_parameters()}
    assert l2_distance(a, snapshot) == pytest.approx(expected, rel=1e-12)
    assert l2_distance(a.trunk, b.trunk) < expected
    assert l2_distance(a, a) == 0.0
    partial = {k: v for k, v in snapshot.items() if k.startswith("trunk")}
    with pytest.raises(ValueError, match="reference lacks"):
        l2_distance(a, partial)
    assert l2_distance(a, partial, strict=False) == pytest.approx(l2_distance(a.trunk, b.trunk))
    with pytest.raises(ValueError, match="shape"):
        l2_distance(a, {**snapshot, "unused": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(TypeError, match="reference"):
        l2_distance(a, 3)  # type: ignore[arg-type]


def test_bert_masking_rates() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    ids = [5 + (i % 90) for i in range(n)]
    special = [1 if i % 10 == 0 else 0 for i in range(n)]
    inputs, labels = _bert_mask(
        ids, special, mask_prob=0.15, mask_token_id=1, vocab_size=100, rng=rng
    )
    chosen = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(special[i] == 0 for i in chosen)
    assert len(chosen) / (0.9 * n) == pytest.approx(0.15, abs=0.005)
    masked = sum(inputs[i] == 1 for i in chosen) / len(chosen)
    kept = sum(inputs[i] == ids[i] for i in chosen) / len(chosen)
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 100, abs=0.01)  # kept, or replaced by itself
    assert all(inputs[i] == ids[i] for i in range(n) if labels[i] == -100)
    # a short sentence always gets one scored token
    _, labels = _bert_mask(
        [7, 8, 9], [1, 0, 1], mask_prob=1e-9, mask_token_id=1, vocab_size=100, rng=rng
    )
    assert labels == [-100, 8, -100]


def tiny_mlm(tmp_path: object) -> tuple[nn.Module, object]:
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    words = "the cat dog sat on mat a big small red blue ran fast slow house tree".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path = Path(str(tmp_path)) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(path.parent))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config), tokenizer


SENTENCES = [
    "the cat sat on the mat",
    "a big dog ran fast",
    "the small red house",
    "a blue tree",
    "the dog sat on a big mat and the cat ran slow",
]


def test_masked_lm_loss_seeded_batch_independent_and_quiet(tmp_path: object) -> None:
    model, tokenizer = tiny_mlm(tmp_path)
    model.train()
    rng = torch.get_rng_state()
    a = masked_lm_loss(model, tokenizer, SENTENCES, seed=3, batch_size=2)
    b = masked_lm_loss(model, tokenizer, SENTENCES, seed=3, batch_size=5)
    c = masked_lm_loss(model, tokenizer, SENTENCES, seed=4, batch_size=5)
    assert a == pytest.approx(b, rel=1e-5)
    assert a != c
    assert math.isfinite(a) and a > 0
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # close to log(vocab) for an untrained model
    assert abs(a - math.log(len(tokenizer))) < 1.0
    with pytest.raises(ValueError, match="mask_prob"):
        masked_lm_loss(model, tokenizer, SENTENCES, mask_prob=0.0)
    with pytest.raises(ValueError, match="texts"):
        masked_lm_loss(model, tokenizer, [])


def test_masked_lm_loss_equals_model_loss_on_same_masks(tmp_path: object) -> None:
    """Token-weighted mean over the masked positions == HF's own loss on one batch."""
    model, tokenizer = tiny_mlm(tmp_path)
    ours = masked_lm_loss(model, tokenizer, SENTENCES, seed=0, batch_size=len(SENTENCES))
    enc = tokenizer(SENTENCES, return_special_tokens_mask=True)
    rows, labels = [], []
    for n, (ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
        # documented: sentence n's masks come from PCG64 on SeedSequence(seed, spawn_key=(n,))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(0, spawn_key=(n,))))
        r, lab = _bert_mask(
            ids,
            special,
            mask_prob=0.15,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            rng=rng,
        )
        rows.append(r)
        labels.append(lab)
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    model.eval()
    with torch.no_grad():
        theirs = float(model(input_ids=input_ids, attention_mask=attention, labels=target).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)


class WordTokenizer:
    """Just enough of a Hugging Face tokenizer for masked_lm_loss: [CLS] words [SEP]."""

    pad_token_id, mask_token_id = 0, 1

    def __init__(self, words: list[str]) -> None:
        self.ids = {w: 4 + i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return 4 + len(self.ids)

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        ids = [[2, *(self.ids[w] for w in text.split()), 3] for text in texts]
        return {
            "input_ids": ids,
            "special_tokens_mask": [[1, *([0] * (len(row) - 2)), 1] for row in ids],
        }


class TinyMLM(nn.Module):
    """Embedding, dropout and a vocabulary head; records its training flag when called."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, vocab_size)
        self.fail = False
        self.seen: list[bool] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        self.seen.append(self.training)
        if self.fail:
            raise RuntimeError("forward failed")
        return (self.head(self.drop(self.embed(input_ids))),)


def test_masked_lm_loss_restores_mixed_flags_also_on_error() -> None:
    tokenizer = WordTokenizer(sorted({w for s in SENTENCES for w in s.split()}))
    torch.manual_seed(0)
    model = TinyMLM(len(tokenizer))
    model.train()
    model.drop.eval()
    flags = [m.training for m in model.modules()]
    loss = masked_lm_loss(model, tokenizer, SENTENCES, batch_size=2)
    assert math.isfinite(loss) and model.seen == [False, False, False]  # eval inside
    assert [m.training for m in model.modules()] == flags
    model.fail = True
    with pytest.raises(RuntimeError, match="forward failed"):
        masked_lm_loss(model, tokenizer, SENTENCES)
    assert [m.training for m in model.modules()] == flags
