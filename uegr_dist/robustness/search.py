"""Greedy word-importance search shared by the text attacks: rank words by how much deleting them lowers the
true-class probability, then, word by word, score the candidate replacements and keep the best, until the prediction
flips or a budget (changed-word fraction, edit distance, queries) runs out.

`attack_examples` (what `uegr-eval` runs) searches many examples together: every round gathers the model inputs that
each open search needs next and scores them all in shared forwards, rows of similar token length together; a search
never has the same model input (token ids) computed twice. With `stop_at_first_flip` a word's candidates are scored
in chunks of 4, 4, 8, 16, ... and the search stops at the first candidate, in candidate order, that flips the
prediction; without it all candidates of the word are scored and the most confident flip is kept. Both make the same
changes to the same words up to the word where the prediction flips, so an example succeeds with one exactly when it
succeeds with the other (the same attacked accuracy); only the replacement of that last word and the number of
queries can differ. Queries count as before: the clean input, each word deletion of the importance pass and each
candidate scored (all of a chunk, also those after the first flip) is one query, a repeated model input included.

`greedy_attack` is the one-example search as it was before `attack_examples`: the reference that tests and
benchmarks/attack_speed.py compare it with."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from uegr_dist.robustness.examples import Example
from uegr_dist.robustness.stopwords import is_stop_word
from uegr_dist.robustness.text_edits import WordSpan, edit_distance, replace_words, word_spans
from uegr_dist.robustness.victim import Victim

WordCandidates = Callable[[int, random.Random], list[str]]
"""Replacement words for word i of one text, in a deterministic order given the generator."""

FIRST_CHUNK = 4
"""stop_at_first_flip: a word's candidates are scored in chunks of 4, 4, 8, 16, ... (each as large as all before it)."""


class CandidateSource(Protocol):
    """Where replacement words come from (character edits, a masked LM, a synonym table)."""

    def prepare(self, text: str, spans: list[WordSpan]) -> WordCandidates:
        """Called once per attacked text (a masked LM scores the whole text here); returns the candidates of that
        text's words, still valid after `prepare` was called for other texts (several texts are searched at once)."""

    def candidates(self, spans: list[WordSpan], i: int, rng: random.Random) -> list[str]:
        """Replacement words for word i of the text last prepared, in a deterministic order given `rng`."""


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


Inputs = tuple[list[str], list[str] | None]
"""Model inputs of one request: texts and (for pairs) second texts."""
Search = Generator[Inputs, torch.Tensor, dict[str, Any]]
"""One example's search: yields the model inputs it needs next, is sent their probabilities [N, C], returns its row."""


def search_example(
    example: Example,
    clean_probs: torch.Tensor,
    source: CandidateSource,
    budget: SearchBudget,
    rng: random.Random,
    target: str = "auto",
    stop_at_first_flip: bool = True,
) -> Search:
    """The greedy search on one example, as a generator (see `Search`); its row: status skipped / success / failed,
    adversarial text, queries (model inputs scored, the clean one included), changed words. clean_probs float [C]
    are the model's probabilities on the unmodified example."""
    field_name, text, spans, row = _open_row(example, clean_probs, target)
    label, clean_pred = row["label"], row["clean_prediction"]
    if clean_pred != label:
        return _skipped(row, text)

    def inputs(texts: list[str]) -> Inputs:
        """The example with the attacked text replaced by each of `texts`."""
        if field_name == "text_pair":
            return [example.text] * len(texts), texts
        return texts, [example.text_pair] * len(texts) if example.text_pair is not None else None

    used = 1
    max_changes = math.floor(budget.max_word_fraction * len(spans) + 1e-9)
    editable = [i for i, s in enumerate(spans) if not (budget.protect_stop_words and is_stop_word(s.text))]
    current: dict[int, str] = {}
    current_text, current_prob, current_pred = text, float(clean_probs[label]), clean_pred
    edits_used = 0
    if max_changes > 0 and editable:
        word_candidates = source.prepare(text, spans)
        # Importance: true-class probability drop when the word is deleted (all words scored in one request).
        scored = editable[: max(0, budget.query_budget - used)]
        importance = {i: -math.inf for i in editable}
        if scored:
            probs = yield inputs([replace_words(text, spans, {i: ""}) for i in scored])
            used += len(scored)
            for i, p in zip(scored, probs[:, label].tolist()):
                importance[i] = current_prob - p
        order = sorted(editable, key=lambda i: (-importance[i], i))
        for i in order:
            if len(current) >= max_changes or used >= budget.query_budget:
                break
            candidates = word_candidates(i, rng)
            if budget.max_total_edits is not None:
                left = budget.max_total_edits - edits_used
                # The distance never exceeds the longer word's length: only compute it when that could break the budget.
                word = spans[i].text
                candidates = [c for c in candidates if max(len(word), len(c)) <= left or edit_distance(word, c) <= left]
            candidates = candidates[: budget.query_budget - used]
            if not candidates:
                continue
            texts = [replace_words(text, spans, {**current, i: c}) for c in candidates]
            if stop_at_first_flip:
                parts: list[torch.Tensor] = []
                while (done := sum(len(p) for p in parts)) < len(texts):
                    part = yield inputs(texts[done : done + max(FIRST_CHUNK, done)])
                    used += len(part)
                    parts.append(part)
                    if bool((part.argmax(dim=-1) != label).any()):
                        break
                probs = torch.cat(parts)
            else:
                probs = yield inputs(texts)
                used += len(texts)
            true_prob = probs[:, label]
            flipped = probs.argmax(dim=-1) != label
            if flipped.any():
                if stop_at_first_flip:
                    best = int(flipped.nonzero()[0, 0])
                else:
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
    return _finished(row, spans, current, current_text, current_pred, used)


def attack_examples(
    victim: Victim,
    examples: Sequence[Example],
    clean_probs: Sequence[torch.Tensor],
    source: CandidateSource,
    budget: SearchBudget,
    rngs: Sequence[random.Random],
    target: str = "auto",
    stop_at_first_flip: bool = True,
) -> list[dict[str, Any]]:
    """Attack `examples` together -> their JSONL rows, in order. Each round scores the next request of every open
    search (`search_example`) in shared forwards of `victim.batch_size` rows (`score_requests`). clean_probs[k] and
    rngs[k] belong to examples[k]."""
    searches = [
        search_example(ex, p, source, budget, rng, target, stop_at_first_flip)
        for ex, p, rng in zip(examples, clean_probs, rngs, strict=True)
    ]
    rows: list[dict[str, Any] | None] = [None] * len(searches)
    known: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in searches]
    waiting: dict[int, Inputs] = {}

    def advance(k: int, probs: torch.Tensor | None) -> None:
        try:
            waiting[k] = searches[k].send(probs)  # type: ignore[arg-type]
        except StopIteration as finished:
            rows[k], known[k] = finished.value, {}

    for k in range(len(searches)):
        advance(k, None)
    while waiting:
        asked = sorted(waiting.items())
        waiting.clear()
        answers = score_requests(victim, [inputs for _, inputs in asked], [known[k] for k, _ in asked])
        for (k, _), probs in zip(asked, answers):
            advance(k, probs)
    return rows  # type: ignore[return-value]


def score_requests(
    victim: Victim, requests: list[Inputs], known: list[dict[tuple[int, ...], torch.Tensor]]
) -> list[torch.Tensor]:
    """Probabilities [N_r, C] of every request r. known[r] maps the token ids of the model inputs that request r's
    search has had scored to their probabilities: a model input is computed once per search (equal inputs get equal
    probabilities, whichever forward they would have been in), and the new ones of all requests are computed
    together, in forwards of rows of similar token length (little padding). Single texts and pairs go apart."""
    keys: list[list[tuple[int, ...]]] = [[] for _ in requests]
    for paired in (False, True):
        group = [r for r, (_, pairs) in enumerate(requests) if (pairs is not None) == paired]
        if not group:
            continue
        texts = [t for r in group for t in requests[r][0]]
        pairs = [t for r in group for t in requests[r][1]] if paired else None  # type: ignore[union-attr]
        owners = [r for r in group for _ in requests[r][0]]
        ids = [tuple(row) for row in victim.token_ids(texts, pairs)]
        new: dict[tuple[int, tuple[int, ...]], int] = {}  # (request, ids) -> first row with them
        for j, (r, key) in enumerate(zip(owners, ids)):
            keys[r].append(key)
            if key not in known[r]:
                new.setdefault((r, key), j)
        todo = sorted(new.values(), key=lambda j: len(ids[j]))
        probs = victim.probabilities([texts[j] for j in todo], [pairs[j] for j in todo] if pairs else None)
        for j, p in zip(todo, probs):
            known[owners[j]][ids[j]] = p
    return [torch.stack([known[r][key] for key in keys[r]]) for r in range(len(requests))]


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
    changed words). clean_probs float [C] are the model's probabilities on the unmodified example (1 query).

    The search as it was before `attack_examples` (one example, all candidates of a word in one request, scored in
    forwards of its own): kept unchanged as the reference `attack_examples` is tested and benchmarked against;
    `uegr-eval` does not call it."""
    field_name, text, spans, row = _open_row(example, clean_probs, target)
    label, clean_pred = row["label"], row["clean_prediction"]
    if clean_pred != label:
        return _skipped(row, text)

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
    return _finished(row, spans, current, current_text, current_pred, used)


def _open_row(
    example: Example, clean_probs: torch.Tensor, target: str
) -> tuple[str, str, list[WordSpan], dict[str, Any]]:
    """The attacked field, its text and word spans, and the start of the example's result row (1 query: the clean
    one)."""
    field_name = attacked_field(example, target)
    text = example.text_pair if field_name == "text_pair" else example.text
    assert text is not None
    spans = word_spans(text)
    row: dict[str, Any] = {
        "index": example.index,
        "text": example.text,
        "text_pair": example.text_pair,
        "label": example.label,
        "attacked_field": field_name,
        "clean_prediction": int(clean_probs.argmax()),
        "num_words": len(spans),
        "queries": 1,
    }
    return field_name, text, spans, row


def _skipped(row: dict[str, Any], text: str) -> dict[str, Any]:
    """The final row of an example the model already gets wrong: not attacked."""
    return {
        **row,
        "status": "skipped",
        "adversarial_text": text,
        "adversarial_prediction": row["clean_prediction"],
        "words_changed": 0,
        "edit_distance": 0,
        "changes": [],
    }


def _finished(
    row: dict[str, Any],
    spans: Sequence[WordSpan],
    current: dict[int, str],
    current_text: str,
    current_pred: int,
    used: int,
) -> dict[str, Any]:
    """The final row of an attacked example: success when the prediction left the label, the words changed."""
    changes = [{"word": i, "from": spans[i].text, "to": current[i]} for i in sorted(current)]
    return {
        **row,
        "status": "success" if current_pred != row["label"] else "failed",
        "adversarial_text": current_text,
        "adversarial_prediction": current_pred,
        "queries": used,
        "words_changed": len(current),
        "edit_distance": sum(edit_distance(c["from"], c["to"]) for c in changes),
        "changes": changes,
    }
