"""Reading values on the host without stalling the device.

A training step that reads a device tensor's value into Python (`.item()`, `bool(t)`, `.tolist()`, ...) makes the
host wait until the device has run every kernel queued before it: on a GPU the queue drains and the device idles
while the host prepares the next kernels. uegr-dist's step reads no device value. What it does read lives on the
host by construction, and goes through the two helpers here, so that a test can tell them apart from device reads
(`tests/test_sync_free.py` counts every other read during training steps and expects none):

- `host_values` reads a CPU tensor (and refuses any other): e.g. the dropout rates drawn from a CPU generator;
- `DeferredValue` copies a device value to the host without waiting (pinned memory, a non-blocking copy and a CUDA
  event) and reads it later, one step on, when the copy has long arrived: the non-finite guard's decision and the
  adaptive dropout controller's divergence.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_local = threading.local()


def reading_host() -> bool:
    """True inside `host_values` (for tests that count device reads)."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def host_values(tensor: torch.Tensor) -> Any:
    """`tensor.tolist()` of a CPU tensor; a tensor on any other device is refused (reading it would synchronize)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"host_values reads host (CPU) tensors only, got one on {tensor.device}")
    with _reading():
        return tensor.tolist()


class DeferredValue:
    """A tensor's value on its way to the host: `DeferredValue(t)` starts the copy without waiting, `get()` returns
    it (Python numbers, as `tolist`), waiting only for that copy (on a GPU: for the kernels queued before it, which
    one step later have long run)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        value = tensor.detach()
        self._event: Any = None
        if value.device.type == "cpu":
            self._host = value.clone()
        elif value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # no asynchronous copy known for this device: copy now
            self._host = value.to("cpu")

    def get(self) -> Any:
        """The value (after the copy has landed)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return host_values(self._host)
