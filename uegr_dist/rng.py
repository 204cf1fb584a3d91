"""Counter-based random numbers keyed by (seed, stream, row key): the same key gives the same numbers on any rank.

Dropout masks, adversary initialisations and soft gradient masks drawn from here depend only on *what* they are for
(sample id, chunk, dropout site, step), never on how the batch was split across processes or stacked into chunks.
That is what makes a batched pass equal sequential passes, and a 2-process run equal a 1-process run, bit for bit.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (wrapping arithmetic); a bijection with good avalanche."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _splitmix64_int(x: int) -> int:
    """SplitMix64 on a Python int (host side, no tensor: keeps keyed code free of graph breaks under torch.compile)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_key(*parts: int) -> int:
    """Fold integers (seed, step, stream ids) into one 64-bit key (as a signed int64 value), on the host."""
    acc = 0
    for part in parts:
        acc = _splitmix64_int(acc ^ (int(part) & _MASK64))
    return _signed(acc)


def keyed_uniform(
    key: int,
    row_keys: torch.Tensor,
    row_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) numbers of shape [R, *row_shape]; row r depends only on (key, row_keys[r]) and position.

    row_keys: int64 [R] (e.g. sample_id * n_chunks + chunk). The result is on row_keys' device.
    """
    rows = row_keys.to(torch.int64).reshape(-1, 1)
    numel = 1
    for size in row_shape:
        numel *= int(size)
    base = splitmix64(splitmix64(rows ^ _signed(key)))
    counters = torch.arange(numel, dtype=torch.int64, device=rows.device).reshape(1, -1)
    bits = splitmix64(base + counters)
    # Top 24 bits -> exactly representable float32 in [0, 1).
    uniform = _shr(bits, 40).to(torch.float32) * (1.0 / (1 << 24))
    return uniform.to(dtype).reshape(rows.shape[0], *row_shape)


def keyed_uniform_flat(key: int, start: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) numbers for global flat positions start..start+numel-1 of one stream (float32 [numel]).

    A shard holding positions [start, start + numel) of a flat buffer draws exactly the numbers a single process
    would draw for those positions.
    """
    positions = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    bits = splitmix64(positions ^ _signed(mix_key(key)))
    return _shr(bits, 40).to(torch.float32) * (1.0 / (1 << 24))
