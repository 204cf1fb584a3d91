"""`evaluate_robustness`: load a saved model and examples, run the configured attacks (examples split across
processes under `accelerate launch`), gather the rows, summarize and write the report."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from uegr_dist.config.loading import ConfigError
from uegr_dist.rng import mix_key
from uegr_dist.robustness.candidates import CharEdits, MaskedLMCandidates, SynonymCandidates
from uegr_dist.robustness.config import EvalConfig, load_eval_config, validate
from uegr_dist.robustness.examples import Example, load_examples, prediction_map
from uegr_dist.robustness.metrics import summarize_pgd, summarize_text_attack
from uegr_dist.robustness.pgd import pgd_batch
from uegr_dist.robustness.report import write_report
from uegr_dist.robustness.search import CandidateSource, SearchBudget, attack_examples
from uegr_dist.robustness.victim import Victim, load_victim

TEXT_ATTACKS = ("char", "word-mlm", "word-synonym")
_ATTACK_STREAM = {"char": 11, "word-mlm": 12, "word-synonym": 13}


class _Processes:
    """Rank, world size and object gathering: a process group only when launched with several processes."""

    def __init__(self) -> None:
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from datetime import timedelta

            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.accelerator = Accelerator(
                cpu=backend == "gloo",
                kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=600))],
            )
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.world = self.accelerator.num_processes if self.accelerator else 1
        single = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = self.accelerator.device if self.accelerator else single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every process's rows, on every process, in example order."""
        if self.accelerator is not None:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        return sorted(rows, key=lambda r: r["index"])

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def local_batches(examples: list[Example], batch_size: int, rank: int, world: int) -> list[list[Example]]:
    """Global batches of consecutive examples, dealt round-robin to the processes: a batch holds the same examples
    whatever the number of processes, so batched results do not depend on it."""
    batches = [examples[lo : lo + batch_size] for lo in range(0, len(examples), batch_size)]
    return batches[rank::world]


def check_output_dir(cfg: EvalConfig) -> Path | None:
    """The output directory, refusing one that already holds a finished evaluation unless `overwrite`."""
    if cfg.output_dir is None:
        return None
    out = Path(cfg.output_dir)
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise ConfigError(
            f"output_dir = {str(out)!r} already holds an evaluation (summary.json); choose another directory or "
            "pass --overwrite"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir = {str(out)!r} is a file, not a directory")
    return out


def _candidate_source(name: str, cfg: EvalConfig, device: torch.device) -> CandidateSource:
    if name == "char":
        return CharEdits(cfg.char.edits, cfg.char.max_edits_per_word, cfg.char.max_candidates_per_word)
    if name == "word-mlm":
        assert cfg.word_mlm.model is not None
        return MaskedLMCandidates(cfg.word_mlm.model, cfg.word_mlm.top_k, device)
    assert cfg.word_synonym.file is not None
    return SynonymCandidates(cfg.word_synonym.file, cfg.word_synonym.cosine_threshold, cfg.word_synonym.max_candidates)


def run_text_attack(
    name: str,
    victim: Victim,
    batches: list[list[Example]],
    clean_probs: dict[int, torch.Tensor],
    source: CandidateSource,
    cfg: EvalConfig,
    show_progress: bool,
) -> list[dict[str, Any]]:
    """Greedy attack `name` on this process's share of the global batches -> JSONL rows. The examples of a batch
    are searched together (their model inputs share forwards); each example's random numbers come from a generator
    keyed by (seed, attack, example index): the same on any process."""
    budget = SearchBudget(
        max_word_fraction=cfg.search.max_word_fraction,
        query_budget=cfg.search.query_budget,
        protect_stop_words=cfg.search.protect_stop_words,
        max_total_edits=cfg.char.max_total_edits if name == "char" else None,
    )
    rows = []
    total = sum(len(batch) for batch in batches)
    with tqdm(total=total, desc=f"attack {name}", disable=not show_progress) as bar:
        for batch in batches:
            rngs = [random.Random(mix_key(cfg.seed, _ATTACK_STREAM[name], e.index)) for e in batch]
            probs = [clean_probs[e.index] for e in batch]
            target, first_flip = cfg.search.target, cfg.search.stop_at_first_flip
            rows += attack_examples(victim, batch, probs, source, budget, rngs, target, first_flip)
            bar.update(len(batch))
    return rows


def evaluate_robustness(cfg: EvalConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run every configured attack on the first `data.max_examples` examples; return the summary dict (the content
    of summary.json) and, when `output_dir` is set, write summary.json, report.md and examples_<attack>.jsonl.

    cfg: an EvalConfig or a nested mapping of its keys (validated the same way). Under `accelerate launch` the
    examples are split across the processes and every process returns the full summary."""
    cfg = validate(cfg) if isinstance(cfg, EvalConfig) else load_eval_config(None, cfg)
    out = check_output_dir(cfg)
    procs = _Processes()
    show = cfg.progress and procs.is_main
    assert cfg.model is not None
    victim = load_victim(cfg.model, cfg.batch_size, cfg.data.max_length, procs.device)
    label2id = {str(k): int(v) for k, v in (victim.model.config.label2id or {}).items()}
    victim.label_map = prediction_map(cfg.data, victim.num_labels)
    if victim.label_map is not None and any(name.startswith("pgd") for name in cfg.attacks):
        raise ConfigError(
            f"attacks: pgd works on the model's own classes; task {cfg.data.task} merges them (prediction map): "
            "use the text attacks or --attack none"
        )
    examples = load_examples(cfg.data, label2id, victim.num_labels)
    batches = local_batches(examples, cfg.batch_size, procs.rank, procs.world)
    mine = [e for batch in batches for e in batch]

    clean_probs: dict[int, torch.Tensor] = {}
    for batch in tqdm(batches, desc="clean", disable=not show):
        pairs = [e.text_pair for e in batch] if batch[0].text_pair is not None else None
        probs = victim.probabilities([e.text for e in batch], pairs)  # type: ignore[arg-type]
        clean_probs.update({e.index: p for e, p in zip(batch, probs)})
    clean_rows = procs.gather_rows(
        [{"index": e.index, "label": e.label, "prediction": int(clean_probs[e.index].argmax())} for e in mine]
    )

    rows: dict[str, list[dict[str, Any]]] = {}
    attacks: dict[str, Any] = {}
    timing: dict[str, dict[str, float]] = {}
    for name in cfg.attacks:
        tic, queries = time.perf_counter(), victim.queries
        if name in TEXT_ATTACKS:
            source = _candidate_source(name, cfg, procs.device)
            local = run_text_attack(name, victim, batches, clean_probs, source, cfg, show)
            rows[name] = procs.gather_rows(local)
            attacks[name] = summarize_text_attack(rows[name])
        else:
            for norm in cfg.pgd.norms:
                eps = cfg.pgd.eps_l2 if norm == "l2" else cfg.pgd.eps_linf
                local = []
                for batch in tqdm(batches, desc=f"pgd {norm}", disable=not show):
                    preds = [int(clean_probs[e.index].argmax()) for e in batch]
                    local += pgd_batch(victim, batch, preds, norm, eps, cfg.pgd.steps, cfg.pgd.step_size, cfg.seed)
                rows[f"pgd_{norm}"] = procs.gather_rows(local)
                attacks[f"pgd_{norm}"] = summarize_pgd(rows[f"pgd_{norm}"], norm, cfg.pgd.steps, cfg.pgd.step_size)
        seconds = time.perf_counter() - tic
        timing[name] = {"seconds": seconds, "queries_this_process": victim.queries - queries}

    n = len(clean_rows)
    summary = {
        "model": cfg.model,
        "data": cfg.data.file,
        "n_examples": n,
        "seed": cfg.seed,
        "clean": {"accuracy": sum(r["prediction"] == r["label"] for r in clean_rows) / n},
        "attacks": attacks,
        "config": dataclasses.asdict(cfg),
        # Wall time differs between runs and process counts: kept apart from the results.
        "timing": {"num_processes": procs.world, "main_process": timing},
    }
    if out is not None and procs.is_main:
        write_report(out, summary, rows)
    procs.barrier()
    return summary
