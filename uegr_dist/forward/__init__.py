"""Forward stage of UEGR: adversarial embeddings, per-chunk dropout sub-models, their divergence and rate schedule."""

from uegr_dist.forward.adversary import perturb_embeddings
from uegr_dist.forward.chunk_dropout import ChunkDropoutController, ChunkedDropout, install_chunk_dropout
from uegr_dist.forward.divergence import at_least_float32, js_divergence, prediction_variance, symmetric_kl
from uegr_dist.forward.dropout_schedule import DropoutRateSchedule

__all__ = [
    "at_least_float32",
    "ChunkDropoutController",
    "ChunkedDropout",
    "DropoutRateSchedule",
    "install_chunk_dropout",
    "js_divergence",
    "perturb_embeddings",
    "prediction_variance",
    "symmetric_kl",
]
