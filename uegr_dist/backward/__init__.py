"""Backward stage of UEGR: saliency scores, exact top-rho selection (sharding-ready) and the masked optimizer step."""

from uegr_dist.backward.masked_adamw import MaskedAdamW
from uegr_dist.backward.masking import (
    MASK_KINDS,
    SCOPES,
    GradientMasker,
    MaskOptions,
    MaskStats,
    SplitMasking,
    keep_count,
    segment_names,
)
from uegr_dist.backward.radix_select import (
    RadixThreshold,
    TopK,
    radix_select_threshold,
    relative_rank,
    select_top_k,
    select_top_k_ordered,
)
from uegr_dist.backward.saliency import SALIENCY_KINDS, SaliencyScorer
from uegr_dist.backward.selective_adamw import SelectiveAdamW, decay_groups
from uegr_dist.backward.zero_masking import ZeroGradientMasker

__all__ = [
    "MASK_KINDS",
    "SALIENCY_KINDS",
    "SCOPES",
    "GradientMasker",
    "MaskOptions",
    "MaskStats",
    "MaskedAdamW",
    "RadixThreshold",
    "SaliencyScorer",
    "SelectiveAdamW",
    "SplitMasking",
    "TopK",
    "ZeroGradientMasker",
    "decay_groups",
    "keep_count",
    "radix_select_threshold",
    "relative_rank",
    "segment_names",
    "select_top_k",
    "select_top_k_ordered",
]
