"""Counter-based keyed random numbers: uniform, and independent of how rows or positions are split."""

import pytest
import torch

from uegr_dist import rng
from uegr_dist.rng import _signed, keyed_uniform, keyed_uniform_flat, mix_key, splitmix64


def test_host_and_tensor_mixing_agree():
    for value in (0, 1, 5, 2**40 + 3, -7):
        assert mix_key(value) == int(splitmix64(torch.tensor(_signed(value), dtype=torch.int64)))
    assert mix_key(1, 2) != mix_key(2, 1)


def test_rows_depend_only_on_their_key():
    keys = torch.tensor([4, 9, 1, 7])
    whole = keyed_uniform(mix_key(3), keys, (5, 6))
    assert whole.shape == (4, 5, 6)
    torch.testing.assert_close(keyed_uniform(mix_key(3), keys[2:], (5, 6)), whole[2:], rtol=0, atol=0)
    torch.testing.assert_close(keyed_uniform(mix_key(3), keys.flip(0), (5, 6)), whole.flip(0), rtol=0, atol=0)
    assert not torch.equal(keyed_uniform(mix_key(4), keys, (5, 6)), whole)


def test_flat_positions_are_shard_independent_and_uniform():
    full = keyed_uniform_flat(11, 0, 200_000)
    torch.testing.assert_close(keyed_uniform_flat(11, 123_456, 1000), full[123_456:124_456], rtol=0, atol=0)
    assert 0.0 <= full.min() and full.max() < 1.0
    assert abs(full.mean().item() - 0.5) < 0.005
    assert abs((full < 0.3).float().mean().item() - 0.3) < 0.005


def _reference_flat(key: int, start: int, numel: int) -> torch.Tensor:
    """The generator as its definition reads: one expression, no blocks, no in-place work."""
    bits = splitmix64(torch.arange(start, start + numel, dtype=torch.int64) ^ _signed(mix_key(key)))
    return ((bits >> 40) & ((1 << 24) - 1)).to(torch.float32) / (1 << 24)


def _reference_rows(key: int, row_keys: torch.Tensor, numel: int) -> torch.Tensor:
    base = splitmix64(splitmix64(row_keys.reshape(-1, 1) ^ _signed(key)))
    bits = splitmix64(base + torch.arange(numel, dtype=torch.int64).reshape(1, -1))
    return ((bits >> 40) & ((1 << 24) - 1)).to(torch.float32) / (1 << 24)


@pytest.mark.parametrize("chunk", [rng.KEYED_CHUNK, 7, 64])
def test_blocked_in_place_generators_equal_the_definition(chunk, monkeypatch):
    """keyed_uniform_flat / keyed_uniform work in blocks of KEYED_CHUNK with in-place int64 arithmetic (for speed
    and bounded memory); block edges (small chunks here) must not change a single bit."""
    monkeypatch.setattr(rng, "KEYED_CHUNK", chunk)
    for key, start, numel in [(11, 0, 1000), (5, 123_456, 333), (-3, 2**40, 65)]:
        assert torch.equal(keyed_uniform_flat(key, start, numel), _reference_flat(key, start, numel))
    keys = torch.tensor([4, 9, 1, 7, 2**50])
    for numel in (30, 1, 129):
        want = _reference_rows(mix_key(3), keys, numel)
        assert torch.equal(keyed_uniform(mix_key(3), keys, (numel,)), want)
