"""Dropout rates of the K sub-models for each optimizer step: fixed, redrawn, or redrawn around an adaptive shift."""

from __future__ import annotations

import math
from typing import Any

import torch

from uegr_dist.backward.host import DeferredValue, host_values
from uegr_dist.rng import mix_key

MODES = ("fixed", "redraw", "adaptive")
# Rates near 1 blow up the 1 / (1 - p) scaling of inverted dropout.
MAX_RATE = 0.95


class DropoutRateSchedule:
    """K dropout rates per step; "redraw" and "adaptive" depend only on (seed, step, shift), so every process agrees.

    "adaptive" shifts the range [p_min, p_max] by s, and `update(js)` moves s by gain * (target_js - js): more dropout
    while the sub-models agree more than the target, less while they disagree more. `observe(js)` takes the
    measurement as a (device) tensor instead and applies it at the next `rates` (or `state_dict`) call, by which time
    its copy to the host has arrived: the same shifts as `update` right away, without reading a device value in the
    step that measured it.
    """

    def __init__(
        self,
        k: int,
        p_min: float,
        p_max: float,
        mode: str = "redraw",
        target_js: float = 0.05,
        gain: float = 0.5,
        seed: int = 0,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"DropoutRateSchedule: k must be an int >= 1, got {k!r}")
        if not 0.0 <= p_min <= p_max < 1.0:
            raise ValueError(f"DropoutRateSchedule: need 0 <= p_min <= p_max < 1, got p_min={p_min!r}, p_max={p_max!r}")
        if mode not in MODES:
            raise ValueError(f"DropoutRateSchedule: mode must be one of {MODES}, got {mode!r}")
        if not target_js >= 0.0:
            raise ValueError(f"DropoutRateSchedule: target_js must be >= 0, got {target_js!r}")
        if not gain >= 0.0:
            raise ValueError(f"DropoutRateSchedule: gain must be >= 0, got {gain!r}")
        self.k = k
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.mode = mode
        self.target_js = float(target_js)
        self.gain = float(gain)
        self.seed = int(seed)
        self.shift = 0.0
        self._pending: DeferredValue | None = None

    def rates(self, step: int) -> list[float]:
        """The K rates (Python floats in [0, MAX_RATE]) for optimizer step `step`."""
        self._apply_pending()
        low = _clamp_rate(self.p_min + self.shift)
        high = _clamp_rate(self.p_max + self.shift)
        if self.mode == "fixed":
            if self.k == 1:
                return [(low + high) / 2.0]
            return [low + (high - low) * i / (self.k - 1) for i in range(self.k)]
        generator = torch.Generator().manual_seed(mix_key(self.seed, step))
        draws = host_values(torch.rand(self.k, generator=generator, dtype=torch.float64))  # a CPU generator
        return [low + (high - low) * u for u in draws]

    def update(self, measured_js: float) -> None:
        """Move the adaptive shift toward the target JS (no-op in "fixed"/"redraw"); pass the all-process mean."""
        if not math.isfinite(measured_js):
            raise ValueError(f"DropoutRateSchedule.update: measured_js must be finite, got {measured_js!r}")
        if self.mode != "adaptive":
            return
        # Beyond +-MAX_RATE the whole range is clamped anyway; bounding s stops it winding up without limit.
        self.shift = min(MAX_RATE, max(-MAX_RATE, self.shift + self.gain * (self.target_js - measured_js)))

    def observe(self, measured_js: torch.Tensor) -> None:
        """`update` with a tensor (the all-process mean JS, 0-dim, on any device), applied at the next `rates` or
        `state_dict` call; its value travels to the host meanwhile (no wait in the step that measured it)."""
        self._apply_pending()
        self._pending = DeferredValue(measured_js.detach().reshape(()))

    def _apply_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.update(float(pending.get()))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry (the adaptive shift, with any observed measurement applied)."""
        self._apply_pending()
        return {"shift": self.shift}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self._pending = None
        self.shift = float(state["shift"])


def _clamp_rate(rate: float) -> float:
    """rate clamped to [0, MAX_RATE]."""
    return min(MAX_RATE, max(0.0, rate))
