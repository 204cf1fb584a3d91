"""Radix select equals a stable-sort reference, in one process and across simulated shards in lockstep."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
import torch

from tests.conftest import run_in_threads
from uegr_dist.backward.radix_select import (
    digit_widths,
    radix_select_threshold,
    relative_rank,
    select_top_k,
    select_top_k_ordered,
)


def reference_top_k(scores: torch.Tensor, offsets: list[int], k: list[int]) -> torch.Tensor:
    """Per segment, the first k indices of a stable descending sort (ties: lowest position first)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    for s in range(len(offsets) - 1):
        order = torch.sort(scores[offsets[s] : offsets[s + 1]], descending=True, stable=True).indices
        keep[offsets[s] + order[: k[s]]] = True
    return keep


def reference_rank(scores: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Average ascending rank / (size - 1) per segment (size-1 segments: 1), by brute-force comparison."""
    ranks = torch.zeros(scores.numel(), dtype=torch.float64)
    for s in range(len(offsets) - 1):
        seg = scores[offsets[s] : offsets[s + 1]].double()
        if seg.numel() == 1:
            ranks[offsets[s]] = 1.0
        elif seg.numel() > 1:
            smaller = (seg[None, :] < seg[:, None]).sum(1)
            equal = (seg[None, :] == seg[:, None]).sum(1)
            ranks[offsets[s] : offsets[s + 1]] = (smaller + (equal - 1) / 2) / (seg.numel() - 1)
    return ranks


def random_scores(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Score vectors that stress different digits: heavy ties, wide exponents with subnormals, zeros, uniform."""
    if kind == "ties":
        return torch.randint(0, 5, (n,), generator=gen).float()
    if kind == "exponents":
        exponent = torch.randint(-45, 38, (n,), generator=gen).double()
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 10.0**exponent).float()
    if kind == "zeros":
        return torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.2)
    return torch.rand(n, generator=gen)


def random_segments(n: int, num_segments: int, gen: torch.Generator) -> list[int]:
    """Uneven boundaries [S+1] over [0, n], empty and size-1 segments included by chance."""
    cuts = sorted(torch.randint(0, n + 1, (num_segments - 1,), generator=gen).tolist())
    return [0, *cuts, n]


@pytest.mark.parametrize("kind", ["ties", "exponents", "zeros", "uniform"])
def test_select_top_k_matches_stable_sort(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    for trial in range(60):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        offsets = random_segments(n, int(torch.randint(1, 7, (1,), generator=gen)), gen)
        scores = random_scores(kind, n, gen)
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
        # Random k, with k = 1, k = n and k > n (clamped) forced on some trials.
        k = [[1, size, size + 3][trial % 3] if trial < 9 else int(torch.randint(0, size + 1, (1,))) for size in sizes]
        chunk = int(torch.randint(1, 64, (1,), generator=gen))
        result = select_top_k(scores, torch.tensor(offsets), torch.tensor(k), chunk_size=chunk)
        expected = reference_top_k(scores, offsets, k)
        assert torch.equal(result.keep, expected), (trial, offsets, k)
        assert result.keep.sum() == sum(min(a, b) for a, b in zip(k, sizes))


def test_special_values_and_size_one_segments() -> None:
    tiny = torch.finfo(torch.float32).tiny
    scores = torch.tensor([0.0, tiny / 4, tiny / 2, tiny, 1e-30, 3.0, 3.0, float("inf"), 3e38, 0.0, tiny / 4, 7.0])
    offsets = [0, 1, 1, 5, 6, 12]  # sizes 1, 0, 4, 1, 6
    for k in ([1, 0, 2, 1, 3], [1, 0, 4, 1, 6], [0, 0, 1, 0, 1]):
        keep = select_top_k(scores, torch.tensor(offsets), torch.tensor(k), chunk_size=5).keep
        assert torch.equal(keep, reference_top_k(scores, offsets, k))


def test_threshold_and_counts() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 2.0, 0.0, 0.5, 0.5])
    result = radix_select_threshold(scores, torch.tensor([0, 6, 9]), torch.tensor([3, 0]))
    assert result.threshold[0] == 3.0 and torch.isnan(result.threshold[1])
    assert result.num_greater.tolist() == [1, 0]
    assert result.num_equal[0] == 3 and result.num_equal_kept[0] == 2
    keep = select_top_k(scores, torch.tensor([0, 6, 9]), torch.tensor([3, 2])).keep
    assert keep.nonzero().squeeze(1).tolist() == [0, 2, 3, 7, 8]


def test_large_buffer_with_many_segments_matches_sort() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 300_000
    scores = (torch.randn(n, generator=gen) * torch.randn(n, generator=gen)).abs()
    scores[::7] = 0.0  # a big block of ties at zero
    offsets = [0, 1, 2, *sorted(torch.randint(2, n, (40,), generator=gen).tolist()), n]
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    k = [max(1, int(0.9 * size)) for size in sizes]  # deep enough to cut through the zeros
    keep = select_top_k(scores, torch.tensor(offsets), torch.tensor(k), chunk_size=50_000).keep
    assert torch.equal(keep, reference_top_k(scores, offsets, k))


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (torch.tensor([1.0, -2.0]), ">= 0"),
        (torch.tensor([1.0, -0.0]), ">= 0"),
        (torch.tensor([1.0, float("nan")]), "NaN"),
    ],
)
def test_invalid_scores_raise(scores: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_top_k(scores, torch.tensor([0, 2]), torch.tensor([1]))


def test_invalid_arguments_raise() -> None:
    scores = torch.rand(4)
    with pytest.raises(ValueError, match="float32"):
        select_top_k(scores.double(), torch.tensor([0, 4]), torch.tensor([1]))
    with pytest.raises(ValueError, match="one entry per segment"):
        select_top_k(scores, torch.tensor([0, 4]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        select_top_k(scores, torch.tensor([0, 3, 2, 4]), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="k must be >= 0"):
        select_top_k(scores, torch.tensor([0, 4]), torch.tensor([-1]))


def test_relative_rank_matches_average_rank() -> None:
    gen = torch.Generator().manual_seed(5)
    # Integers share no 16-bit bucket with a different value below 256, so the ranks are exact average ranks.
    scores = torch.randint(0, 200, (500,), generator=gen).float()
    offsets = [0, 1, 2, 120, 120, 500]
    ranks = relative_rank(scores, torch.tensor(offsets), chunk_size=37)
    torch.testing.assert_close(ranks.double(), reference_rank(scores, offsets), rtol=0, atol=1e-6)
    # Values closer than the 16-bit resolution share their bucket's mean rank; ordering across buckets holds.
    close = torch.tensor([1.0, 1.0001, 1.0002, 2.0, 0.5])
    assert relative_rank(close, torch.tensor([0, 5])).tolist() == [0.5, 0.5, 0.5, 1.0, 0.0]


class Lockstep:
    """`world` shards run in threads; all_reduce_sum sums their tensors at a barrier and logs each call's size."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.sizes: list[list[int]] = [[] for _ in range(world)]

    def all_reduce_sum(self, rank: int) -> Callable[[torch.Tensor], None]:
        def reduce(tensor: torch.Tensor) -> None:
            assert tensor.dtype == torch.int64
            self.sizes[rank].append(tensor.numel())
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack([slot for slot in self.slots if slot is not None]).sum(0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            tensor.copy_(total)

        return reduce

    def run(self, fn: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        return run_in_threads(self.world, self.barrier, fn)


def contiguous_shards(n: int, world: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Uneven contiguous [start, stop) ranges covering [0, n), as ZeRO-1/2 partitions of one flat buffer."""
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist())
    bounds = [0, *cuts, n]
    return list(zip(bounds, bounds[1:]))


def select_on_contiguous_shards(
    scores: torch.Tensor, offsets: list[int], k: list[int], shards: list[tuple[int, int]]
) -> tuple[torch.Tensor, Lockstep]:
    """Run select_top_k on each [start, stop) shard in lockstep; the shards' keep masks concatenated."""
    group = Lockstep(len(shards))

    def shard_keep(rank: int) -> torch.Tensor:
        start, stop = shards[rank]
        return select_top_k(
            scores[start:stop].clone(),
            torch.tensor(offsets).clamp(start, stop) - start,
            torch.tensor(k),
            position_runs=torch.tensor([[0, start]]),
            all_reduce_sum=group.all_reduce_sum(rank),
            chunk_size=17,
        ).keep

    return torch.cat(group.run(shard_keep)), group


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["ties", "exponents", "zeros"])
def test_contiguous_shards_equal_single_process(world: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(11 + world)
    for _ in range(6):
        n = int(torch.randint(50, 600, (1,), generator=gen))
        scores = random_scores(kind, n, gen)
        offsets = random_segments(n, int(torch.randint(1, 5, (1,), generator=gen)), gen)
        k = [int(torch.randint(0, b - a + 1, (1,), generator=gen)) for a, b in zip(offsets, offsets[1:])]
        keep, group = select_on_contiguous_shards(scores, offsets, k, contiguous_shards(n, world, gen))
        assert torch.equal(keep, reference_top_k(scores, offsets, k))
        partial_ties = any(
            0 < kk - int((scores[a:b] > t).sum()) < int((scores[a:b] == t).sum())
            for a, b, kk, t in zip(offsets, offsets[1:], k, _kth(scores, offsets, k))
        )
        for sizes in group.sizes:
            # 4 score passes (+ 5 position passes only when a segment keeps part of its ties), S * 256 counts each.
            assert sizes == [(len(offsets) - 1) * 256] * (9 if partial_ties else 4)


def _kth(scores: torch.Tensor, offsets: list[int], k: list[int]) -> list[float]:
    """The k-th largest value per segment (NaN when k = 0)."""
    values = []
    for a, b, kk in zip(offsets, offsets[1:], k):
        ordered = torch.sort(scores[a:b], descending=True).values
        values.append(float(ordered[kk - 1]) if kk > 0 else float("nan"))
    return values


def select_on_interleaved_shards(
    scores: torch.Tensor, tensor_starts: list[int], per_tensor: bool, k: list[int], world: int
) -> torch.Tensor:
    """ZeRO-3-like layout: rank r holds the r-th piece of every tensor; returns the union of kept global positions."""
    pieces = []  # (rank, global_start, length)
    for start, stop in zip(tensor_starts, tensor_starts[1:]):
        cuts = [start + (stop - start) * r // world for r in range(world + 1)]
        pieces += [(r, cuts[r], cuts[r + 1] - cuts[r]) for r in range(world)]
    group = Lockstep(world)

    def shard_keep(rank: int) -> torch.Tensor:
        mine = [(g, length) for r, g, length in pieces if r == rank]
        lengths = [length for _, length in mine]
        runs = [[local, g] for local, (g, _) in zip([0, *itertools.accumulate(lengths)], mine)]
        # A rank holds one piece of each tensor, which is that tensor's local segment.
        local_offsets = [0, *itertools.accumulate(lengths)] if per_tensor else [0, sum(lengths)]
        keep = select_top_k(
            torch.cat([scores[g : g + length] for g, length in mine]),
            torch.tensor(local_offsets),
            torch.tensor(k),
            position_runs=torch.tensor(runs),
            all_reduce_sum=group.all_reduce_sum(rank),
            chunk_size=29,
        ).keep
        global_keep = torch.zeros(scores.numel(), dtype=torch.bool)
        for (g, length), piece in zip(mine, keep.split(lengths)):
            global_keep[g : g + length] = piece
        return global_keep

    return torch.stack(group.run(shard_keep)).any(0)


@pytest.mark.parametrize("per_tensor", [True, False])
def test_interleaved_shards_equal_single_process(per_tensor: bool) -> None:
    """A segment spread over ranks in pieces: ties still go to the lowest global position."""
    gen = torch.Generator().manual_seed(2)
    sizes = [1, 40, 7, 130, 3, 64]
    scores = torch.randint(0, 6, (sum(sizes),), generator=gen).float()  # heavy ties: positions decide
    starts = [0, *itertools.accumulate(sizes)]
    offsets = starts if per_tensor else [0, starts[-1]]
    k = [max(1, int(0.3 * (b - a))) for a, b in zip(offsets, offsets[1:])]
    union = select_on_interleaved_shards(scores, starts, per_tensor, k, world=3)
    assert torch.equal(union, reference_top_k(scores, offsets, k))


def test_relative_rank_sharded_equals_single_process() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 700
    scores = random_scores("exponents", n, gen)
    offsets = [0, 300, 301, n]
    expected = relative_rank(scores, torch.tensor(offsets))
    shards = contiguous_shards(n, 3, gen)
    group = Lockstep(3)

    def shard_rank(rank: int) -> torch.Tensor:
        start, stop = shards[rank]
        local_offsets = torch.tensor(offsets).clamp(start, stop) - start
        return relative_rank(scores[start:stop].clone(), local_offsets, all_reduce_sum=group.all_reduce_sum(rank))

    assert torch.equal(torch.cat(group.run(shard_rank)), expected)


def _old_thresholds_equal(old, new) -> bool:
    """RadixThreshold fields equal (NaN thresholds where k = 0 compare as equal)."""
    for a, b in zip(old, new):
        if a.is_floating_point():
            if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])):
                return False
        elif not torch.equal(a, b):
            return False
    return True


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize("kind", ["ties", "exponents", "zeros", "uniform"])
def test_ordered_select_matches_stable_sort_and_select_top_k(kind: str, fixed_shapes: bool) -> None:
    """The two-pass 16-bit select (candidate lists, or fixed shapes as on a GPU) keeps exactly the stable sort's
    set, with select_top_k's thresholds and counts; many segments narrow the digits, k = 0 and k > size included."""
    gen = torch.Generator().manual_seed(17)
    for trial in range(24):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        num_segments = int(torch.randint(1, 40 if trial % 4 == 0 else 6, (1,), generator=gen))
        offsets = random_segments(n, num_segments, gen)
        scores = random_scores(kind, n, gen)
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
        k = [
            [1, size, size + 3, 0][trial % 4] if trial < 12 else int(torch.randint(0, size + 1, (1,))) for size in sizes
        ]
        chunk = int(torch.randint(16, 128, (1,), generator=gen))
        result = select_top_k_ordered(scores, offsets, torch.tensor(k), fixed_shapes=fixed_shapes, chunk_size=chunk)
        assert torch.equal(result.keep, reference_top_k(scores, offsets, k)), (trial, offsets, k)
        old = select_top_k(scores, torch.tensor(offsets), torch.tensor(k)).thresholds
        assert _old_thresholds_equal(old, result.thresholds)
        # A float 0 / 1 output buffer (what the masker uses) holds the same set.
        out = torch.full((n,), 7.0)
        select_top_k_ordered(scores, offsets, torch.tensor(k), fixed_shapes=fixed_shapes, out=out)
        assert torch.equal(out.bool(), result.keep) and set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ordered_shards_equal_single_process(world: int, fixed_shapes: bool) -> None:
    """Contiguous slices of one buffer (the split DDP masker): ties cut across ranks go to the lowest positions."""
    gen = torch.Generator().manual_seed(23 + world)
    for kind in ("ties", "exponents", "zeros"):
        for _ in range(4):
            n = int(torch.randint(50, 600, (1,), generator=gen))
            scores = random_scores(kind, n, gen)
            offsets = random_segments(n, int(torch.randint(1, 5, (1,), generator=gen)), gen)
            k = [int(torch.randint(0, b - a + 1, (1,), generator=gen)) for a, b in zip(offsets, offsets[1:])]
            group = Lockstep(world)
            keep = torch.cat(
                group.run(
                    _ordered_shard_keep(scores, offsets, k, contiguous_shards(n, world, gen), group, fixed_shapes)
                )
            )
            assert torch.equal(keep, reference_top_k(scores, offsets, k))
            # Two histogram passes and one all-reduce of the ties' per-rank counts.
            assert all(len(sizes) == 3 for sizes in group.sizes)


def _ordered_shard_keep(
    scores: torch.Tensor,
    offsets: list[int],
    k: list[int],
    shards: list[tuple[int, int]],
    group: Lockstep,
    fixed_shapes: bool,
) -> Callable[[int], torch.Tensor]:
    def shard_keep(rank: int) -> torch.Tensor:
        start, stop = shards[rank]
        return select_top_k_ordered(
            scores[start:stop].clone(),
            [min(max(o, start), stop) - start for o in offsets],
            torch.tensor(k),
            all_reduce_sum=group.all_reduce_sum(rank),
            rank=rank,
            world=len(shards),
            fixed_shapes=fixed_shapes,
            chunk_size=13,
        ).keep

    return shard_keep


def test_ordered_select_validates_on_request_and_never_crashes_on_nan() -> None:
    scores = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(ValueError, match="finite"):
        select_top_k_ordered(scores, [0, 4], torch.tensor([2]), validate=True)
    for fixed_shapes in (False, True):  # a non-finite step's garbage scores: some set, no error
        negative_nan = torch.tensor([-float("nan"), 1.0, -2.0]).abs().neg()
        select_top_k_ordered(negative_nan, [0, 3], torch.tensor([1]), fixed_shapes=fixed_shapes)
        select_top_k_ordered(scores, [0, 4], torch.tensor([2]), fixed_shapes=fixed_shapes)


def test_digit_widths_bound_the_histograms() -> None:
    assert digit_widths(1) == digit_widths(16) == (16, 16)
    for segments in (17, 100, 300, 5000):
        widths = digit_widths(segments)
        assert sum(widths) == 32 and segments * 2 ** max(widths) <= 1 << 21
