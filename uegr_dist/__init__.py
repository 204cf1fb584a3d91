"""uegr-dist: distributed UEGR fine-tuning of encoder language models (Accelerate + DeepSpeed ZeRO)."""

__version__ = "0.1.0"
