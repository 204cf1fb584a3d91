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


def _shr_into(z: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """out <- logical right shift of int64 z by `bits` (no allocation)."""
    torch.bitwise_right_shift(z, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def splitmix64_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`splitmix64` in place on z, with `scratch` (int64, z's shape) as the only work memory: the same bits
    without the eight full-size temporaries of the expression form."""
    z.add_(_GOLDEN)
    z.bitwise_xor_(_shr_into(z, 30, scratch)).mul_(_MIX1)
    z.bitwise_xor_(_shr_into(z, 27, scratch)).mul_(_MIX2)
    return z.bitwise_xor_(_shr_into(z, 31, scratch))


def _top24_to_unit(bits: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float32) <- the top 24 bits of `bits` as exactly representable numbers in [0, 1)."""
    out.copy_(_shr_into(bits, 40, scratch))
    return out.mul_(1.0 / (1 << 24))


KEYED_CHUNK = 1 << 20
"""Elements per block of the keyed generators: two int64 blocks of work memory, whatever the request's size."""


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
    base = splitmix64(splitmix64(rows ^ _signed(key)))  # [R, 1]
    uniform = torch.empty(rows.shape[0], numel, dtype=torch.float32, device=rows.device)
    step = max(1, min(numel, KEYED_CHUNK // max(1, rows.shape[0])))  # counters per block, all rows at once
    bits = torch.empty(rows.shape[0], step, dtype=torch.int64, device=rows.device)
    scratch = torch.empty_like(bits)
    for lo in range(0, numel, step):
        n = min(step, numel - lo)
        block, work = bits[:, :n], scratch[:, :n]
        torch.arange(lo, lo + n, dtype=torch.int64, device=rows.device, out=work[0])
        torch.add(base, work[0], out=block)  # base + counter
        _top24_to_unit(splitmix64_(block, work), work, uniform[:, lo : lo + n])
    return uniform.to(dtype).reshape(rows.shape[0], *row_shape)


def keyed_uniform_flat(key: int, start: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) numbers for global flat positions start..start+numel-1 of one stream (float32 [numel]).

    A shard holding positions [start, start + numel) of a flat buffer draws exactly the numbers a single process
    would draw for those positions.
    """
    uniform = torch.empty(numel, dtype=torch.float32, device=device)
    stream = _signed(mix_key(key))
    bits = torch.empty(min(numel, KEYED_CHUNK), dtype=torch.int64, device=device)
    scratch = torch.empty_like(bits)
    for lo in range(0, numel, KEYED_CHUNK):
        n = min(KEYED_CHUNK, numel - lo)
        block, work = bits[:n], scratch[:n]
        torch.arange(start + lo, start + lo + n, dtype=torch.int64, device=device, out=block)
        _top24_to_unit(splitmix64_(block.bitwise_xor_(stream), work), work, uniform[lo : lo + n])
    return uniform
