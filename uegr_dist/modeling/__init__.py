"""Loading models and tokenizers."""

from uegr_dist.modeling.loading import build_word_level_tokenizer, load_model, load_tokenizer, resolve_model_path

__all__ = ["build_word_level_tokenizer", "load_model", "load_tokenizer", "resolve_model_path"]
