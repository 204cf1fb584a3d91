"""One stacked forward of the K sub-models + clean pass vs K + 1 sequential forwards (forward + backward).

    python -m benchmarks.stacked_forward --hidden 256 --layers 4 --batch 8 --seq 64 --k 2 --rounds 12
    python -m benchmarks.stacked_forward --device cuda --dtype bf16 --arch roberta --hidden 1024 --layers 24 \
        --vocab 50265 --batch 16 --seq 128 --rounds 8 --out benchmarks/results/stacked_gpu.json

Both variants compute the same thing (tests/test_uegr_method.py proves equality of the losses and gradients): the
stacked variant runs [clean; sub_1; ...; sub_K] as one batch of (K + 1) * B rows inside `controller.chunks`, the
sequential one runs K + 1 forwards of B rows, one chunk each. A plain forward + backward of B rows (what vanilla
costs per step) is timed alongside, so the table also shows each variant against the (K + 1) x vanilla floor.
Rounds interleave the variants (noise hits all alike); the first 2 rounds are dropped; medians are reported.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import StageTimer, machine_info, median_records, random_classifier
from uegr_dist.forward import install_chunk_dropout


def main() -> None:
    """Parse the sizes, time the three variants, print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="bert")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--out", default=None, help="also write the JSON summary to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    size = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "intermediate_size": 4 * args.hidden,
        "max_position_embeddings": max(512, args.seq + 2),
    }
    if args.arch == "roberta":
        size["max_position_embeddings"] = max(514, args.seq + 2)
    model = random_classifier(args.arch, size).to(device)
    controller = install_chunk_dropout(model)
    n, b = args.k + 1, args.batch
    ids = torch.randint(5, args.vocab, (b, args.seq), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (b,), device=device)
    rates = [None] + [0.05 + 0.25 * i / max(1, args.k - 1) for i in range(args.k)]

    def vanilla() -> None:
        with autocast:
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
        loss.backward()

    def stacked() -> None:
        with autocast, controller.chunks(rates):
            logits = model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1)).logits
        F.cross_entropy(logits.float(), labels.repeat(n)).backward()

    def sequential() -> None:
        losses = []
        for rate in rates:
            with autocast, controller.chunks([rate]):
                logits = model(input_ids=ids, attention_mask=mask).logits
            losses.append(F.cross_entropy(logits.float(), labels))
        torch.stack(losses).mean().backward()

    variants = {"vanilla": vanilla, "stacked": stacked, "sequential": sequential}
    timer = StageTimer(args.device)
    for _ in range(args.rounds):
        timer.start_step()
        for name, fn in variants.items():
            model.zero_grad(set_to_none=True)
            with timer(name):
                fn()
    median = median_records(timer.steps[2:])
    summary = json.dumps(
        {
            "args": vars(args),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "median_s": {k: round(v, 4) for k, v in median.items()},
            "sequential_over_stacked": round(median["sequential"] / median["stacked"], 3),
            "stacked_over_floor": round(median["stacked"] / (n * median["vanilla"]), 3),
            "machine": machine_info(args.device),
        }
    )
    print(summary)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(summary + "\n")


if __name__ == "__main__":
    main()
