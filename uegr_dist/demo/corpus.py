"""The demo's sentiment corpus: short movie-review sentences with negation and contrast, generated from a fixed
seed so that the files shipped beside this module can be rebuilt exactly (`python -m uegr_dist.demo.corpus`).

Negation ("is not dull") and contrast ("X is dull, but Y is superb": the clause after "but" decides) make the
labels depend on word order, not only on which adjectives occur."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "sentiment_train.jsonl"
VALIDATION_FILE = HERE / "sentiment_validation.jsonl"

SUBJECTS = [
    "the movie",
    "this film",
    "the acting",
    "the plot",
    "the soundtrack",
    "the cast",
    "the ending",
    "the script",
    "the cinematography",
    "the pacing",
    "the dialogue",
    "the lead actress",
    "the villain",
    "the story",
    "the sequel",
    "the direction",
    "the score",
    "the humor",
    "the final act",
    "the premise",
]
POSITIVE = [
    "wonderful",
    "brilliant",
    "moving",
    "delightful",
    "gripping",
    "charming",
    "superb",
    "heartfelt",
    "clever",
    "stunning",
    "memorable",
    "engaging",
    "funny",
    "beautiful",
    "thrilling",
    "smart",
    "touching",
    "fresh",
]
NEGATIVE = [
    "dull",
    "tedious",
    "clumsy",
    "forgettable",
    "boring",
    "messy",
    "lifeless",
    "predictable",
    "shallow",
    "painful",
    "bland",
    "awkward",
    "silly",
    "confusing",
    "flat",
    "lazy",
    "pointless",
    "stale",
]
INTENSIFIERS = ["", "really ", "truly ", "quite ", "remarkably ", "utterly "]
NEGATIONS = ["not", "never", "hardly", "not at all"]


def _clause(rng: random.Random, positive: bool) -> str:
    """A clause whose sentiment is `positive`, possibly by negating an adjective of the other polarity."""
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.3:
        adjective = rng.choice(NEGATIVE if positive else POSITIVE)
        return f"{subject} is {rng.choice(NEGATIONS)} {adjective}"
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    verb = rng.choice(["is", "was", "felt", "seemed"])
    return f"{subject} {verb} {rng.choice(INTENSIFIERS)}{adjective}"


def _sentence(rng: random.Random) -> tuple[str, str]:
    label = rng.random() < 0.5
    form = rng.random()
    if form < 0.45:
        text = _clause(rng, label)
    elif form < 0.75:
        text = f"{_clause(rng, not label)}, but {_clause(rng, label)}"
    elif form < 0.9:
        text = f"although {_clause(rng, not label)}, {_clause(rng, label)}"
    else:
        opener = rng.choice(["honestly,", "in the end", "overall", "to be fair,"])
        text = f"{opener} {_clause(rng, label)}"
    return text + ".", "positive" if label else "negative"


def build_corpus(n_train: int = 800, n_validation: int = 200, seed: int = 2503) -> tuple[list[dict], list[dict]]:
    """Distinct labelled sentences, split into train and validation (no sentence in both)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_validation:
        text, label = _sentence(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows[:n_train], rows[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    train_rows, validation_rows = build_corpus()
    write_jsonl(train_rows, TRAIN_FILE)
    write_jsonl(validation_rows, VALIDATION_FILE)
    print(f"wrote {len(train_rows)} + {len(validation_rows)} rows to {HERE}")
