"""Greedy word-importance search shared by the text attacks: rank words by how much deleting them lowers the
true-class probability, then, word by word, score every candidate replacement in batched forwards and keep the
best, until the prediction flips or a budget (changed-word fraction, edit distance, queries) runs out."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from uegr_dist.robustness.examples import Example
from uegr_dist.robustness.stopwords import is_stop_word
from uegr_dist.robustness.text_edits import WordSpan, edit_distance, replace_words, word_spans
from uegr_dist.robustness.victim import Victim


class CandidateSource(Protocol):
    """Where replacement words come from (character edits, a masked LM, a synonym table)."""

    def prepare(self, text: str, spans: list[WordSpan]) -> None:
        """Called once per attacked text before `candidates` (a masked LM scores the whole text here)."""

    def candidates(self, spans: list[WordSpan], i: int, rng: random.Random) -> list[str]:
        """Replacement words for word i, in a deterministic order given `rng`."""


@dataclass
class SearchBudget:
    """Limits of one attack on one example."""

    max_word_fraction: float = 0.3
    query_budget: int = 2000
    protect_stop_words: bool = True
    max_total_edits: int | None = None  # edit-distance budget over the text (character attack only)


def attacked_field(example: Example, target: str) -> str:
    """'text' or 'text_pair': which text of the example is edited (auto = the pair's second text if there is one)."""
    if target == "auto":
        return "text_pair" if example.text_pair is not None else "text"
    return target


def greedy_attack(
    victim: Victim,
    example: Example,
    clean_probs: torch.Tensor,
    source: CandidateSource,
    budget: SearchBudget,
    rng: random.Random,
    target: str = "auto",
) -> dict[str, Any]:
    """Attack one example; returns its JSONL row (status skipped / success / failed, adversarial text, queries,
    changed words). clean_probs float [C] are the model's probabilities on the unmodified example (1 query)."""
    field_name = attacked_field(example, target)
    text = example.text_pair if field_name == "text_pair" else example.text
    assert text is not None
    spans = word_spans(text)
    label = example.label
    clean_pred = int(clean_probs.argmax())
    row: dict[str, Any] = {
        "index": example.index,
        "text": example.text,
        "text_pair": example.text_pair,
        "label": label,
        "attacked_field": field_name,
        "clean_prediction": clean_pred,
        "num_words": len(spans),
        "queries": 1,
    }
    if clean_pred != label:
        return {
            **row,
            "status": "skipped",
            "adversarial_text": text,
            "adversarial_prediction": clean_pred,
            "words_changed": 0,
            "edit_distance": 0,
            "changes": [],
        }

    used = 1

    def score(texts: list[str]) -> torch.Tensor:
        """Probabilities [len(texts), C] of the example with the attacked text replaced by each of `texts`."""
        nonlocal used
        used += len(texts)
        if field_name == "text_pair":
            return victim.probabilities([example.text] * len(texts), texts)
        pairs = [example.text_pair] * len(texts) if example.text_pair is not None else None
        return victim.probabilities(texts, pairs)  # type: ignore[arg-type]

    max_changes = math.floor(budget.max_word_fraction * len(spans) + 1e-9)
    editable = [i for i, s in enumerate(spans) if not (budget.protect_stop_words and is_stop_word(s.text))]
    current: dict[int, str] = {}
    current_text, current_prob, current_pred = text, float(clean_probs[label]), clean_pred
    edits_used = 0
    if max_changes > 0 and editable:
        source.prepare(text, spans)
        # Importance: true-class probability drop when the word is deleted (one batched scoring of all words).
        allowed = max(0, budget.query_budget - used)
        scored = editable[:allowed]
        importance = {i: -math.inf for i in editable}
        if scored:
            probs = score([replace_words(text, spans, {i: ""}) for i in scored])
            for i, p in zip(scored, probs[:, label].tolist()):
                importance[i] = current_prob - p
        order = sorted(editable, key=lambda i: (-importance[i], i))
        for i in order:
            if len(current) >= max_changes or used >= budget.query_budget:
                break
            candidates = source.candidates(spans, i, rng)
            if budget.max_total_edits is not None:
                left = budget.max_total_edits - edits_used
                # The distance never exceeds the longer word's length: only compute it when that could break the budget.
                word = spans[i].text
                candidates = [c for c in candidates if max(len(word), len(c)) <= left or edit_distance(word, c) <= left]
            candidates = candidates[: budget.query_budget - used]
            if not candidates:
                continue
            texts = [replace_words(text, spans, {**current, i: c}) for c in candidates]
            probs = score(texts)
            true_prob = probs[:, label]
            flipped = probs.argmax(dim=-1) != label
            if flipped.any():
                best = int(torch.where(flipped, true_prob, torch.full_like(true_prob, math.inf)).argmin())
            else:
                best = int(true_prob.argmin())
                if float(true_prob[best]) >= current_prob:
                    continue
            current[i] = candidates[best]
            if budget.max_total_edits is not None:
                edits_used += edit_distance(spans[i].text, candidates[best])
            current_text, current_prob = texts[best], float(true_prob[best])
            current_pred = int(probs[best].argmax())
            if current_pred != label:
                break
    changes = [{"word": i, "from": spans[i].text, "to": current[i]} for i in sorted(current)]
    return {
        **row,
        "status": "success" if current_pred != label else "failed",
        "adversarial_text": current_text,
        "adversarial_prediction": current_pred,
        "queries": used,
        "words_changed": len(current),
        "edit_distance": sum(edit_distance(c["from"], c["to"]) for c in changes),
        "changes": changes,
    }
