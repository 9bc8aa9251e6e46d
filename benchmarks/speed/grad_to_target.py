"""Gradient computations to reach a dev target: SeqReptile versus MTL (the analogue of Fig. 7c).

A small real multi-task problem that runs on 2 CPU cores in minutes: MasakhaNER NER in five
languages (hau, ibo, kin, swa, yor), one task per language, with a small tagger trained from
scratch (hashed character-trigram word vectors, a BiGRU, a linear tag layer). No pretrained
model is involved, so this measures optimisation speed only, not forgetting.

Methods, all with AdamW and the same budget of *gradient computations* (one batch
forward/backward of 16 sentences of one language):

* ``mtl``: every step averages one batch of each of the 5 languages (5 computations a step);
* ``sequential``: one single-task batch per step, p_t ∝ N_t^q (SeqReptile with outer_lr = 1):
  the control with as many optimizer steps as SeqReptile;
* ``seqreptile``: the same batches, K inner steps, then the outer update (two (K, eta) pairs).

Dev F1 (micro, entity level, mean over languages) of the weights each method keeps (the slow
weights for SeqReptile) is recorded every ``--eval-every`` computations; the report gives the
full curves, and the computations each run needed to reach the target
(``--target-fraction`` × the best mean dev F1 of MTL over the seeds).

Run: ``python -m benchmarks.speed.grad_to_target [--budget 4000 --seeds 0 1 2]`` (~40 min).
Writes ``grad_to_target.{json,md,png}`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.data import Sentence, default_data_dir, entity_f1, masakhaner
from torch_seqreptile import MultiTaskBatchSampler, SeqReptile, TaskBatchSampler

LANGUAGES = ["hau", "ibo", "kin", "swa", "yor"]
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"]
BUCKETS = 1 << 15
RESULTS = Path(__file__).resolve().parents[1] / "results"


def trigram_ids(word: str) -> list[int]:
    padded = f"<{word.lower()}>"
    grams = [padded[i : i + 3] for i in range(max(1, len(padded) - 2))] + [f"w:{word.lower()}"]
    return [zlib.crc32(g.encode()) % BUCKETS for g in grams]


@dataclass
class Encoded:
    """A language's sentences as padded tensors (grams per word kept as EmbeddingBag input)."""

    grams: list[list[list[int]]]
    tags: list[list[int]]
    gold: list[list[str]]


def encode(sentences: list[Sentence], max_words: int = 64) -> Encoded:
    return Encoded(
        grams=[[trigram_ids(w) for w in words[:max_words]] for words, _ in sentences],
        tags=[[TAGS.index(t) for t in tags[:max_words]] for _, tags in sentences],
        gold=[tags[:max_words] for _, tags in sentences],
    )


def collate(
    data: Encoded, rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat gram ids, bag offsets, word mask and tags (-100 on padding) for ``rows``."""
    length = max(len(data.tags[r]) for r in rows)
    flat: list[int] = []
    offsets: list[int] = []
    tags = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        for j in range(length):
            offsets.append(len(flat))
            flat.extend(data.grams[r][j] if j < len(data.grams[r]) else [0])
        tags[i, : len(data.tags[r])] = torch.tensor(data.tags[r])
    return torch.tensor(flat), torch.tensor(offsets), tags != -100, tags


class Tagger(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.grams = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.rnn = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, len(TAGS))

    def forward(self, flat: torch.Tensor, offsets: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        words = self.grams(flat, offsets).view(*shape, -1)
        return self.out(self.rnn(words)[0])


def batch_loss(model: Tagger, data: Encoded, rows: list[int]) -> torch.Tensor:
    flat, offsets, _, tags = collate(data, rows)
    logits = model(flat, offsets, tags.shape)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=-100)


@torch.no_grad()
def dev_f1(model: Tagger, dev: list[Encoded]) -> list[float]:
    model.eval()
    scores = []
    for data in dev:
        predicted: list[list[str]] = []
        for start in range(0, len(data.tags), 64):
            rows = list(range(start, min(start + 64, len(data.tags))))
            flat, offsets, mask, tags = collate(data, rows)
            best = model(flat, offsets, tags.shape).argmax(-1)
            for i in range(len(rows)):
                predicted.append([TAGS[k] for k in best[i, : int(mask[i].sum())].tolist()])
        scores.append(entity_f1(data.gold, predicted))
    model.train()
    return scores


def local_rows(indices: list[int], offsets: list[int]) -> tuple[int, list[int]]:
    task = max(t for t, o in enumerate(offsets) if o <= indices[0])
    return task, [i - offsets[task] for i in indices]


def run(
    method: str,
    inner_steps: int,
    outer_lr: float,
    seed: int,
    args: argparse.Namespace,
    train: list[Encoded],
    dev: list[Encoded],
) -> dict[str, object]:
    torch.manual_seed(seed)
    model = Tagger()
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sizes = [len(d.tags) for d in train]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    curve: list[tuple[int, float, list[float]]] = []
    computations = 0
    start = time.perf_counter()

    def evaluate() -> None:
        if isinstance(opt, SeqReptile):
            with opt.slow_weights():
                scores = dev_f1(model, dev)
        else:
            scores = dev_f1(model, dev)
        curve.append((computations, statistics.mean(scores), scores))

    if method == "mtl":
        opt: torch.optim.Optimizer = inner
        sampler = MultiTaskBatchSampler(
            sizes,
            args.batch_size,
            len(sizes),
            q=args.q,
            seed=seed,
            num_batches=args.budget // len(sizes),
        )
        evaluate()
        for indices in sampler:
            per_task: dict[int, list[int]] = {}
            for i in indices:
                task, rows = local_rows([i], offsets)
                per_task.setdefault(task, []).extend(rows)
            opt.zero_grad()
            losses = [batch_loss(model, train[t], rows) for t, rows in per_task.items()]
            torch.stack(losses).mean().backward()
            opt.step()
            before = computations
            computations += len(losses)
            if computations // args.eval_every > before // args.eval_every:
                evaluate()
    else:
        opt = SeqReptile(inner, inner_steps, outer_lr)
        sampler = TaskBatchSampler(
            sizes, args.batch_size, q=args.q, seed=seed, num_batches=args.budget
        )
        evaluate()
        for indices in sampler:
            task, rows = local_rows(indices, offsets)
            opt.zero_grad()
            batch_loss(model, train[task], rows).backward()
            opt.step()
            computations += 1
            if computations % args.eval_every == 0:
                evaluate()
    return {
        "method": method,
        "inner_steps": inner_steps,
        "outer_lr": outer_lr,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "curve": [{"computations": c, "mean_dev_f1": f, "dev_f1": s} for c, f, s in curve],
    }


def label(run: dict[str, object]) -> str:
    if run["method"] == "seqreptile":
        return f"seqreptile K={run['inner_steps']} eta={run['outer_lr']}"
    return str(run["method"])


def first_reach(curve: list[dict[str, object]], target: float) -> int | None:
    return next((int(p["computations"]) for p in curve if float(p["mean_dev_f1"]) >= target), None)  # type: ignore[arg-type]


def report(runs: list[dict[str, object]], fraction: float) -> tuple[dict[str, object], str]:
    mtl_best = [
        max(float(p["mean_dev_f1"]) for p in r["curve"]) for r in runs if r["method"] == "mtl"
    ]  # type: ignore[attr-defined]
    target = fraction * statistics.mean(mtl_best)
    groups: dict[str, list[dict[str, object]]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    rows = []
    summary: dict[str, object] = {"target_mean_dev_f1": target}
    for name, group in groups.items():
        reached = [first_reach(r["curve"], target) for r in group]  # type: ignore[arg-type]
        final = [float(r["curve"][-1]["mean_dev_f1"]) for r in group]  # type: ignore[index]
        best = [max(float(p["mean_dev_f1"]) for p in r["curve"]) for r in group]  # type: ignore[attr-defined]
        hits = [x for x in reached if x is not None]
        summary[name] = {"computations_to_target": reached, "final": final, "best": best}
        rows.append(
            f"| {name} | {len(group)} | "
            + (f"{statistics.mean(hits):.0f}" if hits else "-")
            + f" ({len(hits)}/{len(group)} reached) | "
            f"{statistics.mean(best):.3f} ± {statistics.pstdev(best):.3f} | "
            f"{statistics.mean(final):.3f} ± {statistics.pstdev(final):.3f} |"
        )
    table = "\n".join(
        [
            f"Target: mean dev F1 ≥ {target:.3f} ({fraction:.0%} of MTL's best, mean over seeds).",
            "",
            "| method | seeds | gradient computations to target (mean) | best mean dev F1 | final mean dev F1 |",
            "|---|---:|---|---|---|",
            *rows,
        ]
    )
    return summary, table + "\n"


def plot(runs: list[dict[str, object]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors: dict[str, str] = {}
    for r in runs:
        name = label(r)
        color = colors.setdefault(name, f"C{len(colors)}")
        xs = [p["computations"] for p in r["curve"]]  # type: ignore[attr-defined]
        ys = [p["mean_dev_f1"] for p in r["curve"]]  # type: ignore[attr-defined]
        ax.plot(
            xs, ys, color=color, alpha=0.8, label=name if r["seed"] == runs[0]["seed"] else None
        )
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("gradient computations (batch forward/backward passes)")
    ax.set_ylabel("mean dev F1 (5 languages)")
    ax.set_title("MasakhaNER, small tagger from scratch: dev F1 vs. gradient computations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--budget", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--q", type=float, default=0.2)
    parser.add_argument(
        "--reptile",
        type=str,
        nargs="+",
        default=["50:0.5", "200:0.3"],
        help="K:eta pairs for SeqReptile",
    )
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--max-sentences", type=int, default=None, help="cap per language (smoke)")
    # One thread: this small model gains nothing from two, and suffers badly when the
    # second core is busy (OpenMP waits).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="grad_to_target")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = [
        encode(masakhaner(args.data_dir, lang, "train")[: args.max_sentences]) for lang in LANGUAGES
    ]
    dev = [
        encode(masakhaner(args.data_dir, lang, "dev")[: args.max_sentences]) for lang in LANGUAGES
    ]
    configs = [("mtl", 1, 1.0), ("sequential", 1, 1.0)] + [
        ("seqreptile", int(k), float(eta)) for k, eta in (pair.split(":") for pair in args.reptile)
    ]
    runs = []
    for seed in args.seeds:
        for method, k, eta in configs:
            result = run(method, k, eta, seed, args, train, dev)
            runs.append(result)
            print(
                f"{label(result)} seed {seed}: final mean dev F1 "
                f"{result['curve'][-1]['mean_dev_f1']:.3f} in {result['seconds']:.0f} s",
                flush=True,
            )  # type: ignore[index]
    summary, table = report(runs, args.target_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / f"{args.name}.json").write_text(
        json.dumps({**meta, "summary": summary, "runs": runs}, indent=1)
    )
    (args.out / f"{args.name}.md").write_text(table)
    plot(runs, float(summary["target_mean_dev_f1"]), args.out / f"{args.name}.png")  # type: ignore[arg-type]
    print(table)


if __name__ == "__main__":
    main()
