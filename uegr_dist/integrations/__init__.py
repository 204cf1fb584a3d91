"""Integrations with other training front-ends: `RobustTrainer`, a transformers `Trainer` running any method.

Imported on first use (`from uegr_dist.integrations import RobustTrainer`), so that nothing heavy loads before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RobustTrainer"]


def __getattr__(name: str) -> Any:
    if name == "RobustTrainer":
        from uegr_dist.integrations.trainer import RobustTrainer

        return RobustTrainer
    raise AttributeError(f"module 'uegr_dist.integrations' has no attribute {name!r}")
