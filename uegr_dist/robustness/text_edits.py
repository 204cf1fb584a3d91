"""Words of a text, character edits of a word (swap, substitute, delete, insert, keyboard typo) and the edit
distance that bounds them (Levenshtein with adjacent swaps counted as one edit)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

EDIT_KINDS = ("swap", "substitute", "delete", "insert", "keyboard")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_WORD = re.compile(r"\w+")

# Neighbouring keys on a QWERTY keyboard (same row and the rows above/below), lower case.
_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    position = {ch: (r, c) for r, row in enumerate(_ROWS) for c, ch in enumerate(row)}
    out: dict[str, str] = {}
    for ch, (r, c) in position.items():
        near = []
        for other, (r2, c2) in position.items():
            if other != ch and abs(r - r2) <= 1 and abs(c - c2) <= 1:
                near.append(other)
        out[ch] = "".join(sorted(near))
    return out


KEYBOARD_NEIGHBOURS: dict[str, str] = _qwerty_neighbours()


@dataclass(frozen=True)
class WordSpan:
    """One word of a text: its characters [start, end) in the text."""

    start: int
    end: int
    text: str


def word_spans(text: str) -> list[WordSpan]:
    """The words (maximal runs of letters, digits and underscores) of `text`, left to right; punctuation and
    whitespace are not words and are never edited."""
    return [WordSpan(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def replace_words(text: str, spans: list[WordSpan], replacements: dict[int, str]) -> str:
    """`text` with word i (index into `spans`) replaced by replacements[i]; everything else is kept as is."""
    pieces, last = [], 0
    for i in sorted(replacements):
        pieces.append(text[last : spans[i].start])
        pieces.append(replacements[i])
        last = spans[i].end
    pieces.append(text[last:])
    return "".join(pieces)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between a and b in which an adjacent transposition also costs 1 (optimal string
    alignment): insertions, deletions, substitutions and swaps are one edit each, as DeepWordBug counts them."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(rows[i - 1][j] + 1, row[j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[i - 2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _match_case(ch: str, like: str) -> str:
    return ch.upper() if like.isupper() else ch


def single_edits(word: str, kinds: tuple[str, ...] | list[str]) -> list[str]:
    """Every distinct word one edit of the given kinds away from `word` (the word itself excluded), in a fixed
    order. swap: adjacent characters exchanged; substitute: one character replaced
    by a letter; delete: one character removed; insert: one letter inserted; keyboard: one character replaced by a
    QWERTY neighbour."""
    out: dict[str, None] = {}
    n = len(word)
    for kind in kinds:
        if kind == "swap":
            for i in range(n - 1):
                out[word[:i] + word[i + 1] + word[i] + word[i + 2 :]] = None
        elif kind == "substitute":
            for i in range(n):
                for ch in ALPHABET:
                    out[word[:i] + _match_case(ch, word[i]) + word[i + 1 :]] = None
        elif kind == "delete":
            if n > 1:
                for i in range(n):
                    out[word[:i] + word[i + 1 :]] = None
        elif kind == "insert":
            for i in range(n + 1):
                like = word[min(i, n - 1)]
                for ch in ALPHABET:
                    out[word[:i] + _match_case(ch, like) + word[i:]] = None
        elif kind == "keyboard":
            for i in range(n):
                for ch in KEYBOARD_NEIGHBOURS.get(word[i].lower(), ""):
                    out[word[:i] + _match_case(ch, word[i]) + word[i + 1 :]] = None
        else:
            raise ValueError(f"unknown edit kind {kind!r} (allowed: {', '.join(EDIT_KINDS)})")
    out.pop(word, None)
    return list(out)


def char_candidates(
    word: str, kinds: list[str], max_distance: int, max_candidates: int, rng: random.Random
) -> list[str]:
    """Words within edit distance `max_distance` of `word` reachable by up to `max_distance` edits of the
    given kinds; at most `max_candidates` of them, sampled with `rng` when there are more (seeded: deterministic)."""
    found: dict[str, None] = {}
    frontier = [word]
    for _ in range(max_distance):
        level: dict[str, None] = {}
        for source in frontier:
            for cand in single_edits(source, kinds):
                if cand != word and cand not in found:
                    level[cand] = None
        # One edit of these kinds is distance 1; after several, the distance (which has no triangle inequality
        # for swaps) must be checked.
        level_list = list(level) if max_distance == 1 else [c for c in level if edit_distance(word, c) <= max_distance]
        found.update(dict.fromkeys(level_list))
        # Expanding every word of a level is combinatorial: continue from a sample of it.
        frontier = level_list if len(level_list) <= max_candidates else rng.sample(level_list, max_candidates)
    candidates = list(found)
    if len(candidates) > max_candidates:
        candidates = rng.sample(candidates, max_candidates)
    return candidates
