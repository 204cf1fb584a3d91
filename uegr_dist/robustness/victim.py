"""The attacked model: a saved sequence classifier + its tokenizer, batched probabilities and a query counter."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from uegr_dist.config.loading import ConfigError


class Victim:
    """Wraps a classifier in eval mode. `probabilities` scores model inputs in chunks of `batch_size` rows and
    counts every input row as one query."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        max_length: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device)
        positions = getattr(model.config, "max_position_embeddings", None)
        # RoBERTa-style models offset positions by the padding index: 2 slots fewer are usable.
        self.max_length = min(max_length, positions - 2) if positions else max_length
        self.queries = 0
        self.label_map: tuple[int, ...] | None = None
        """Model class -> evaluated class (HANS with an MNLI model); probabilities of merged classes are summed."""

    @property
    def num_labels(self) -> int:
        if self.label_map is not None:
            return max(self.label_map) + 1
        return int(self.model.config.num_labels)

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, torch.Tensor]:
        """Tokenize one chunk: dict of [B, S] tensors on the model's device (S = longest row, capped)."""
        enc = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in self.tokenizer.model_input_names}

    def token_ids(self, texts: list[str], pairs: list[str] | None) -> list[list[int]]:
        """The input ids `encode` gives each row, unpadded: equal ids = the same model input."""
        return self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)["input_ids"]

    @torch.no_grad()
    def probabilities(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        """Class probabilities float32 [N, C] of N inputs, computed in forwards of at most `batch_size` rows."""
        out = []
        for lo in range(0, len(texts), self.batch_size):
            chunk_pairs = pairs[lo : lo + self.batch_size] if pairs is not None else None
            logits = self.model(**self.encode(texts[lo : lo + self.batch_size], chunk_pairs)).logits
            probs = logits.float().softmax(dim=-1).cpu()
            if self.label_map is not None:
                index = torch.tensor(self.label_map).expand(probs.shape[0], -1)
                probs = torch.zeros(probs.shape[0], self.num_labels).scatter_add_(1, index, probs)
            out.append(probs)
        self.queries += len(texts)
        if not out:
            return torch.empty(0, self.num_labels)
        return torch.cat(out)


def load_victim(model_dir: str, batch_size: int, max_length: int, device: torch.device | str = "cpu") -> Victim:
    """Load a saved classifier (uegr-train output directory or Hub id; no remote code). Refuses regression models:
    accuracy under attack is defined for classification only."""
    path = Path(model_dir)
    if not path.exists() and (model_dir.startswith((".", "/")) or model_dir.count("/") > 1):
        raise ConfigError(f"model = {model_dir!r}: directory not found")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model = {model_dir!r}: no config.json in the directory (not a saved model)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model = {model_dir!r}: could not be loaded as a sequence classifier: {err}") from err
    if model.config.num_labels < 2 or model.config.problem_type == "regression":
        raise ConfigError(
            f"model = {model_dir!r}: a regression model (num_labels = {model.config.num_labels}); robustness "
            "attacks measure accuracy and need a classification model"
        )
    return Victim(model, tokenizer, batch_size, max_length, device)
