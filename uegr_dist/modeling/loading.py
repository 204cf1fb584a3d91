"""Build the tokenizer and the sequence-classification model a config asks for (Hub, local folder, shipped package)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from uegr_dist.config import ConfigError, ModelConfig
from uegr_dist.config.model_path import resolve_model_path

WORD_LEVEL = "word_level"


def build_word_level_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on `texts`, with BERT-style [CLS] a [SEP] b [SEP] framing."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(cfg: ModelConfig, training_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The configured tokenizer; `word_level` trains one on `training_texts` (random-init models)."""
    name = cfg.tokenizer or cfg.name_or_path
    if name == WORD_LEVEL:
        if training_texts is None:
            raise ConfigError("model.tokenizer = word_level needs training texts")
        vocab = int(cfg.config.get("vocab_size", 2000))
        return build_word_level_tokenizer(training_texts, vocab)
    return AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=cfg.trust_remote_code)


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    num_labels: int,
    id2label: dict[int, str],
    seed: int,
) -> PreTrainedModel:
    """Pretrained weights with a fresh classification head, or a random model built from `architecture` + `config`."""
    label_kwargs = {
        "num_labels": num_labels,
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "problem_type": "regression" if num_labels == 1 else "single_label_classification",
    }
    attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.init == "random":
        overrides = dict(cfg.config)
        overrides.setdefault("vocab_size", len(tokenizer))
        if tokenizer.pad_token_id is not None:
            overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            config = AutoConfig.for_model(cfg.architecture, **overrides, **label_kwargs)
        except ValueError as err:
            raise ConfigError(f"model.architecture = {cfg.architecture!r}: {err}") from err
        if config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"model.config.vocab_size = {config.vocab_size}: smaller than the tokenizer's {len(tokenizer)} tokens"
            )
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config, **attn)
    path = resolve_model_path(cfg.name_or_path)
    return AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=cfg.trust_remote_code, **label_kwargs, **cfg.config, **attn
    )
