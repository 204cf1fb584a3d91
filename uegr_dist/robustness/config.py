"""Typed, validated configuration of `uegr-eval` (YAML via --config, flags, or `--section.key value` overrides)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uegr_dist.config.loading import ConfigError, build_dataclass, merge, parse_overrides, read_yaml
from uegr_dist.robustness.text_edits import EDIT_KINDS

ATTACKS = ("char", "word-mlm", "word-synonym", "pgd")
PGD_NORMS = ("l2", "linf")


@dataclass
class EvalDataConfig:
    """Which examples are attacked."""

    file: str | None = None  # CSV/TSV/JSON/JSONL/Parquet with text (+ pair) and label columns
    task: str | None = None  # a registered task (uegr_dist/data/tasks.py): AdvGLUE, ANLI, HANS, GLUE dev sets, ...
    task_path: str | None = None  # a local copy of the task's Hub dataset (as for uegr-train --data.task_path)
    split: str = "validation"  # which of the task's splits (a role: validation, test, mismatched)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_examples: int = field(default=1000, metadata={"lo": 1})  # the first N rows (the common protocol: 1000)
    max_length: int = field(default=128, metadata={"lo": 8})  # tokens; also capped by the model's positions


@dataclass
class SearchConfig:
    """Budgets shared by the greedy text attacks (char, word-mlm, word-synonym)."""

    max_word_fraction: float = field(default=0.3, metadata={"lo": 0.0, "hi": 1.0, "lo_open": True})
    query_budget: int = field(default=2000, metadata={"lo": 1})  # model inputs evaluated per example
    protect_stop_words: bool = True
    # Which text of a pair is edited: auto = the second (hypothesis) when the data has pairs, else the first.
    target: str = field(default="auto", metadata={"choices": ("auto", "text", "text_pair")})
    # true: a word's candidates are scored in chunks and the search stops at the first one that flips the prediction
    # (fewer queries, the same outcome per example); false: all are scored and the most confident flip is kept.
    stop_at_first_flip: bool = True


@dataclass
class CharAttackConfig:
    """Character-level attack (DeepWordBug / Pruthi style)."""

    edits: list[str] = field(default_factory=lambda: list(EDIT_KINDS))
    max_edits_per_word: int = field(default=1, metadata={"lo": 1, "hi": 3})
    max_total_edits: int = field(default=30, metadata={"lo": 1})  # edit-distance budget over the whole text
    max_candidates_per_word: int = field(default=64, metadata={"lo": 1})


@dataclass
class WordMLMConfig:
    """Word substitution from a masked language model (BERT-Attack style)."""

    model: str | None = None  # path or Hub id of a masked LM (e.g. bert-base-uncased)
    top_k: int = field(default=48, metadata={"lo": 1})


@dataclass
class WordSynonymConfig:
    """Word substitution from a synonym file or word vectors (TextFooler style)."""

    file: str | None = None  # `word syn1 syn2 ...` lines, or a word-vector text file (`word v1 ... vD`)
    cosine_threshold: float = field(default=0.5, metadata={"lo": -1.0, "hi": 1.0})  # word vectors only
    max_candidates: int = field(default=50, metadata={"lo": 1})


@dataclass
class PGDConfig:
    """Projected gradient ascent on the input embeddings; accuracy as a curve over eps."""

    norms: list[str] = field(default_factory=lambda: list(PGD_NORMS))
    eps_l2: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5, 1.0])  # per example, whole text
    eps_linf: list[float] = field(default_factory=lambda: [0.0, 0.001, 0.002, 0.005, 0.01, 0.02])  # per coordinate
    steps: int = field(default=10, metadata={"lo": 1})
    step_size: float = field(default=0.25, metadata={"lo": 0.0, "lo_open": True})  # of eps, per step


@dataclass
class EvalConfig:
    """Everything `uegr-eval` / `evaluate_robustness` needs."""

    model: str | None = None  # a directory saved by uegr-train (or any sequence-classification model)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    attacks: list[str] = field(default_factory=lambda: ["char", "pgd"])
    output_dir: str | None = None
    overwrite: bool = False
    seed: int = 0
    batch_size: int = field(default=32, metadata={"lo": 1})  # model inputs per forward
    progress: bool = True
    search: SearchConfig = field(default_factory=SearchConfig)
    char: CharAttackConfig = field(default_factory=CharAttackConfig)
    word_mlm: WordMLMConfig = field(default_factory=WordMLMConfig)
    word_synonym: WordSynonymConfig = field(default_factory=WordSynonymConfig)
    pgd: PGDConfig = field(default_factory=PGDConfig)


def validate(cfg: EvalConfig) -> EvalConfig:
    """Cross-field checks; raises ConfigError naming the key, the value and what is allowed."""
    if not cfg.model:
        raise ConfigError("model = None: give the directory of a saved model (--model DIR)")
    if cfg.output_dir is not None and not cfg.output_dir.strip():
        raise ConfigError("output_dir = '': give a directory path")
    if cfg.data.file is not None and cfg.data.task is not None:
        raise ConfigError("data: give one of data.file (--file) and data.task (--task), not both")
    if cfg.data.task_path is not None and cfg.data.task is None:
        raise ConfigError(f"data.task_path = {cfg.data.task_path!r} needs data.task")
    for name in cfg.attacks:
        if name not in ATTACKS:
            raise ConfigError(f"attacks: unknown attack {name!r} (allowed: {', '.join(ATTACKS)})")
    if len(set(cfg.attacks)) != len(cfg.attacks):
        raise ConfigError(f"attacks = {cfg.attacks}: an attack is named twice")
    for kind in cfg.char.edits:
        if kind not in EDIT_KINDS:
            raise ConfigError(f"char.edits: unknown edit {kind!r} (allowed: {', '.join(EDIT_KINDS)})")
    if not cfg.char.edits:
        raise ConfigError(f"char.edits = []: name at least one of {', '.join(EDIT_KINDS)}")
    if "word-mlm" in cfg.attacks and not cfg.word_mlm.model:
        raise ConfigError("word_mlm.model = None: the word-mlm attack needs a masked LM path or Hub id (--mlm-model)")
    if "word-synonym" in cfg.attacks:
        if not cfg.word_synonym.file:
            raise ConfigError("word_synonym.file = None: the word-synonym attack needs a synonym file (--synonym-file)")
        if not Path(cfg.word_synonym.file).is_file():
            raise ConfigError(f"word_synonym.file = {cfg.word_synonym.file!r}: file not found")
    for norm in cfg.pgd.norms:
        if norm not in PGD_NORMS:
            raise ConfigError(f"pgd.norms: unknown norm {norm!r} (allowed: {', '.join(PGD_NORMS)})")
    for key, values in (("pgd.eps_l2", cfg.pgd.eps_l2), ("pgd.eps_linf", cfg.pgd.eps_linf)):
        if not values or any(v < 0 for v in values):
            raise ConfigError(f"{key} = {values}: need a non-empty list of eps >= 0")
    if cfg.data.text_pair_column is None and cfg.search.target == "text_pair":
        raise ConfigError("search.target = 'text_pair': data.text_pair_column is not set")
    return cfg


def load_eval_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> EvalConfig:
    """YAML file (optional) + overrides -> validated EvalConfig; ConfigError on any problem."""
    raw = read_yaml(path) if path is not None else {}
    update = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return validate(build_dataclass(EvalConfig, merge(raw, dict(update))))
