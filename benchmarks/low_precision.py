"""How much of the outer update survives in bf16, with bf16 and with float32 slow weights.

A tiny BERT (``transformers.BertForSequenceClassification``, 2 layers, hidden 64) in
bfloat16, AdamW (lr 1e-4) as the inner optimizer, SeqReptile with K = 10, eta = 0.1 on
random token batches. At every outer update each element's exact new phi,
phi + eta (theta_K - phi) in float64 from the stored phi and theta_K, is compared with the
stored result: an element whose exact update is non-zero but whose stored phi did not move
is *lost*. Reported for ``slow_dtype=torch.bfloat16`` (phi kept in the parameters' dtype, as
0.1 did) and the default (float32 phi for bf16 parameters), with the slow weights' memory.

Run: ``python -m benchmarks.low_precision [--updates N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from torch_seqreptile import SeqReptile

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).to(torch.bfloat16)


def measure(slow_dtype: torch.dtype | None, updates: int, inner_steps: int) -> dict[str, float]:
    model = tiny_bert()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SeqReptile(
        torch.optim.AdamW(params, lr=1e-4), 10**9, 0.1, slow_dtype=slow_dtype
    )  # outer updates by hand, to see phi and theta_K around each
    generator = torch.Generator().manual_seed(1)
    changed = lost = 0
    for _ in range(updates):
        for _ in range(inner_steps):
            tokens = torch.randint(1000, (8, 32), generator=generator)
            labels = torch.randint(3, (8,), generator=generator)
            opt.zero_grad()
            model(input_ids=tokens, labels=labels).loss.backward()
            opt.step()
        tracked = [p for p in params if p in opt.state]
        before = [opt.state[p]["slow_weight"].double() for p in tracked]
        theta = [p.detach().double() for p in tracked]
        opt.outer_step()
        for phi, end, p in zip(before, theta, tracked):
            exact = phi + 0.1 * (end - phi)
            moves = exact != phi
            stayed = opt.state[p]["slow_weight"].double() == phi
            changed += int(moves.sum())
            lost += int((moves & stayed).sum())
    slow_bytes = sum(
        opt.state[p]["slow_weight"].numel() * opt.state[p]["slow_weight"].element_size()
        for p in params
        if p in opt.state
    )
    return {
        "changed_elements": changed,
        "lost_elements": lost,
        "lost_fraction": lost / max(changed, 1),
        "slow_weight_bytes": slow_bytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "low_precision.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {
        name: measure(dtype, args.updates, args.inner_steps)
        for name, dtype in (
            ("bf16 phi (slow_dtype=bfloat16)", torch.bfloat16),
            ("float32 phi (default)", None),
        )
    }
    report = {
        "setup": "tiny BERT (2 layers, hidden 64) in bf16, AdamW lr 1e-4, K=10, eta=0.1",
        "updates": args.updates,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    print(f"{report['setup']}, {args.updates} outer updates")
    print(
        f"{'slow weights':34} {'changed':>9} {'lost':>9} {'lost %':>7} {'phi MiB':>8} {'params MiB':>10}"
    )
    for name, row in rows.items():
        print(
            f"{name:34} {row['changed_elements']:9d} {row['lost_elements']:9d} "
            f"{100 * row['lost_fraction']:6.1f}% {row['slow_weight_bytes'] / 2**20:8.2f} "
            f"{row['param_bytes'] / 2**20:10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
