"""Replacement words for the greedy search: character edits, a masked language model, a synonym / word-vector file."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from uegr_dist.config.loading import ConfigError
from uegr_dist.data.text_classification import DataError
from uegr_dist.robustness.text_edits import WordSpan, char_candidates

_ONE_WORD = re.compile(r"\w+")


def _like(candidate: str, original: str) -> str:
    """candidate in the case pattern of original (Capitalised or UPPER); else as given."""
    if original.isupper() and len(original) > 1:
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


class CharEdits:
    """All words within `max_edits` character edits (of `kinds`) of the original, sampled down to `max_candidates`."""

    def __init__(self, kinds: list[str], max_edits: int, max_candidates: int) -> None:
        self.kinds, self.max_edits, self.max_candidates = list(kinds), max_edits, max_candidates

    def prepare(self, text: str, spans: list[WordSpan]) -> Callable[[int, random.Random], list[str]]:
        """Nothing to precompute: the candidates of word i are drawn when asked for."""
        return lambda i, rng: self.candidates(spans, i, rng)

    def candidates(self, spans: list[WordSpan], i: int, rng: random.Random) -> list[str]:
        """Edited versions of word i."""
        return char_candidates(spans[i].text, self.kinds, self.max_edits, self.max_candidates, rng)


class MaskedLMCandidates:
    """BERT-Attack style: one masked-LM forward over the unmodified text; the top-k whole-word tokens predicted at a
    word's first sub-token are its candidates (sub-word pieces, special tokens and the word itself excluded)."""

    def __init__(self, name_or_path: str, top_k: int, device: torch.device | str = "cpu") -> None:
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
            self.model = AutoModelForMaskedLM.from_pretrained(name_or_path, trust_remote_code=False).eval().to(device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"word_mlm.model = {name_or_path!r}: could not be loaded as a masked LM: {err}") from err
        if not self.tokenizer.is_fast:
            raise ConfigError(f"word_mlm.model = {name_or_path!r}: needs a fast tokenizer (word offsets)")
        self.top_k = top_k
        self.device = torch.device(device)
        self.special = set(self.tokenizer.all_special_ids)
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(512, positions - 2)
        self._per_word: dict[int, list[str]] = {}
        # Byte-level BPE (RoBERTa) and SentencePiece (DeBERTa) mark the first piece of a word; the rest are pieces.
        vocab = self.tokenizer.get_vocab()
        self.word_start = next((m for m in ("\u0120", "\u2581") if f"{m}the" in vocab), None)

    def _token_text(self, token_id: int) -> str | None:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special or token.startswith("##"):
            return None
        if self.word_start is not None and not token.startswith(self.word_start):
            return None
        word = self.tokenizer.convert_tokens_to_string([token]).strip()
        return word if _ONE_WORD.fullmatch(word) else None

    @torch.no_grad()
    def prepare(self, text: str, spans: list[WordSpan]) -> Callable[[int, random.Random], list[str]]:
        """One forward of the masked LM over `text`; the candidates of every word of it."""
        enc = self.tokenizer(
            text, return_offsets_mapping=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        offsets = enc.pop("offset_mapping")[0].tolist()
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in self.tokenizer.model_input_names}
        logits = self.model(**inputs).logits[0]
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.cpu()
        self._per_word = {}
        for i, span in enumerate(spans):
            position = next((t for t, (a, b) in enumerate(offsets) if b > a and a <= span.start < b), None)
            if position is None:
                continue
            words: dict[str, None] = {}
            for token_id in top[position].tolist():
                word = self._token_text(token_id)
                if word is not None and word.lower() != span.text.lower():
                    words[_like(word, span.text)] = None
            self._per_word[i] = list(words)
        per_word = self._per_word
        return lambda i, rng: per_word.get(i, [])

    def candidates(self, spans: list[WordSpan], i: int, rng: random.Random) -> list[str]:
        """The masked LM's replacements for word i (computed by `prepare`)."""
        return self._per_word.get(i, [])


class SynonymCandidates:
    """TextFooler style: replacements from a file of `word syn1 syn2 ...` lines, or from a word-vector text file
    (`word v1 ... vD` per line, optional `N D` header) as the nearest words with cosine >= `cosine_threshold`."""

    def __init__(self, path: str, cosine_threshold: float, max_candidates: int) -> None:
        self.path, self.threshold, self.max_candidates = path, cosine_threshold, max_candidates
        self.synonyms: dict[str, list[str]] = {}
        self.vectors: torch.Tensor | None = None
        self.vocab: list[str] = []
        self._index: dict[str, int] = {}
        self._read(Path(path))

    def _read(self, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"{path}: synonym file not found")
        lines = [(n, line.split()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        lines = [(n, parts) for n, parts in lines if parts]
        if not lines:
            raise DataError(f"{path}: synonym file is empty")
        if len(lines[0][1]) == 2 and all(p.isdigit() for p in lines[0][1]):
            lines = lines[1:]  # word2vec header "N D"

        def numeric(parts: list[str]) -> bool:
            try:
                [float(p) for p in parts]
            except ValueError:
                return False
            return True

        if lines and len(lines[0][1]) >= 3 and numeric(lines[0][1][1:]):
            dim = len(lines[0][1]) - 1
            rows = []
            for n, parts in lines:
                if len(parts) - 1 != dim or not numeric(parts[1:]):
                    raise DataError(f"{path}: line {n}: expected a word and {dim} numbers")
                self._index.setdefault(parts[0].lower(), len(self.vocab))
                self.vocab.append(parts[0].lower())
                rows.append([float(p) for p in parts[1:]])
            vectors = torch.tensor(rows, dtype=torch.float32)
            self.vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return
        for _, parts in lines:
            head = parts[0].lower()
            known = self.synonyms.setdefault(head, [])
            for syn in parts[1:]:
                if _ONE_WORD.fullmatch(syn) and syn.lower() != head and syn.lower() not in known:
                    known.append(syn.lower())

    def neighbours(self, word: str) -> list[str]:
        """Replacement words for `word` (lower case), best first, at most `max_candidates`."""
        key = word.lower()
        if self.vectors is None:
            return self.synonyms.get(key, [])[: self.max_candidates]
        row = self._index.get(key)
        if row is None:
            return []
        cosine = self.vectors @ self.vectors[row]
        order = torch.argsort(cosine, descending=True, stable=True).tolist()
        out = []
        for j in order:
            if cosine[j] < self.threshold or len(out) >= self.max_candidates:
                break
            if j != row and self.vocab[j] != key and _ONE_WORD.fullmatch(self.vocab[j]):
                out.append(self.vocab[j])
        return out

    def prepare(self, text: str, spans: list[WordSpan]) -> Callable[[int, random.Random], list[str]]:
        """Nothing to precompute: the synonyms of word i are looked up when asked for."""
        return lambda i, rng: self.candidates(spans, i, rng)

    def candidates(self, spans: list[WordSpan], i: int, rng: random.Random) -> list[str]:
        """Synonyms of word i in its case pattern."""
        return [_like(w, spans[i].text) for w in self.neighbours(spans[i].text)]
