"""uegr-dist: distributed UEGR fine-tuning of encoder language models (Accelerate + DeepSpeed ZeRO).

The library API, for your own Accelerate loop (see examples/accelerate_loop.py):

- `RobustLoss(method, **options)`: a method's forward stage as a loss object, `loss_fn(model, batch).loss`;
- `SelectiveAdamW(named_params, mask=..., max_grad_norm=...)`: the backward stage as the optimizer's `step()`
  (score -> select -> clip -> update); `decay_groups` builds its usual parameter groups; `MaskOptions` says what
  the mask keeps;
- `prepare(accelerator, model, optimizer, ..., loss_fn)`: `accelerator.prepare` plus attaching both to the run's
  backend (one process / DDP, or inside the DeepSpeed ZeRO step);
- `uegr_dist.integrations.RobustTrainer`: a transformers `Trainer` that runs any method by name.

Names are imported on first use, so `import uegr_dist` (and the command-line tools' start-up) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "RobustLoss": "uegr_dist.methods.robust_loss",
    "method_config": "uegr_dist.methods.robust_loss",
    "SelectiveAdamW": "uegr_dist.backward.selective_adamw",
    "decay_groups": "uegr_dist.backward.selective_adamw",
    "MaskOptions": "uegr_dist.backward.masking",
    "prepare": "uegr_dist.engine.backend",
    "StepOutput": "uegr_dist.methods.base",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uegr_dist' has no attribute {name!r}")
