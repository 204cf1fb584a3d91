"""Exact segmented top-k and relative ranks of non-negative float32 scores by radix histograms, shard by shard.

Non-negative float32 values sort like their int32 bit patterns, so the k-th largest value of a segment is found
digit by digit: four passes over the 8-bit digits of the bit pattern, most significant first. Each pass counts the
next digit of the elements that still match the digits chosen so far (a 256-bin histogram per segment), sums the
counts across ranks with one `all_reduce` of S * 256 int64 and picks, per segment, the bin where the count from the
top reaches k. No rank ever sees another rank's values, and the answer is exactly the single-process one.

Elements are identified by a *global position* (their place in the flat parameter order all ranks agree on), not
by the rank that holds them: ties at the threshold are broken towards the lowest global position by a second radix
select on the positions of the tied elements, so the kept set does not depend on how the buffer was sharded, even
when a segment is spread over ranks in interleaved pieces (ZeRO-3 partitions every parameter; ZeRO-1/2 partition
each parameter group separately).

Memory stays bounded: passes over the whole buffer go chunk by chunk (elements that no longer match the chosen
digits fall into spare histogram bins instead of being copied out), and once few candidates remain locally (usually
after the first or second digit) they become an index list (int32 where it fits), which makes the later passes
cheap. Per-element segment ids exist only per chunk.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

AllReduceSum = Callable[[torch.Tensor], None]
"""Sums a tensor in place across all ranks (e.g. `lambda t: dist.all_reduce(t)`); None means one process."""

DEFAULT_CHUNK = 1 << 22
_BINS = 256
_SCORE_SHIFTS = (24, 16, 8, 0)
_POSITION_SHIFTS = (32, 24, 16, 8, 0)
_POSITION_LIMIT = 1 << 40
_INT32_MAX = (1 << 31) - 1
_COMPACT_BELOW = 1 / 8
"""Candidates are compacted (copied into a new index list) once at most this fraction of them survives locally."""
# Top-byte bins of bit patterns that are not finite non-negative values < 2**127: 127 holds inf/NaN (and values
# >= 2**127), 128..255 hold negative values and -0.0.
_SUSPECT_BIN = 127
_NEGATIVE_BINS = slice(128, _BINS)


class RadixThreshold(NamedTuple):
    """Per-segment outcome of a radix select (all tensors [S], identical on every rank)."""

    threshold: torch.Tensor
    """float32: the k-th largest score of the segment (NaN where k = 0 or the segment is empty)."""
    num_greater: torch.Tensor
    """int64: global count of scores strictly greater than the threshold (all kept)."""
    num_equal: torch.Tensor
    """int64: global count of scores equal to the threshold."""
    num_equal_kept: torch.Tensor
    """int64: how many of the equal scores are kept (those with the lowest global positions)."""


class TopK(NamedTuple):
    """Result of `select_top_k`."""

    keep: torch.Tensor
    """bool [n]: the kept elements of this rank."""
    thresholds: RadixThreshold


class _Candidates:
    """A subset of local elements: either the whole range [lo, hi) or an explicit sorted index list."""

    def __init__(self, lo: int, hi: int, index: torch.Tensor | None = None) -> None:
        self.lo, self.hi, self.index = lo, hi, index

    def numel(self) -> int:
        return self.hi - self.lo if self.index is None else self.index.numel()

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """[a, b) ranges over the candidate list (over positions when it is the whole range)."""
        start, stop = (self.lo, self.hi) if self.index is None else (0, self.index.numel())
        for a in range(start, stop, chunk_size):
            yield a, min(a + chunk_size, stop)


class _SegmentedKeys:
    """Local view of the elements being selected: their integer keys, segments and global positions."""

    def __init__(
        self,
        key_of: Callable[[torch.Tensor | slice], torch.Tensor],
        key_dtype: torch.dtype,
        offsets: torch.Tensor,
        runs: torch.Tensor,
    ) -> None:
        self.key_of = key_of
        self.key_dtype = key_dtype
        self.offsets = offsets
        self.bounds = offsets.tolist()
        self.num_segments = offsets.numel() - 1
        self.runs = runs

    def chunk(self, cand: _Candidates, a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(local indices or None for the range a..b, keys, segment ids or None when there is one segment)."""
        if cand.index is None:
            return None, self.key_of(slice(a, b)), self.range_segments(a, b)
        index = cand.index[a:b]
        return index, self.key_of(index), self.index_segments(index)

    def range_segments(self, a: int, b: int) -> torch.Tensor | None:
        """Segment id (int32 [b - a]) of local positions a..b-1 without a per-element search."""
        if self.num_segments == 1:
            return None
        # Segment id = number of inner boundaries at or before the position: a cumulative sum of boundary marks
        # (repeat_interleave is far slower on CPU for small chunks).
        inner = self.offsets[1:-1]
        inside = inner[(inner > a) & (inner < b)] - a
        marks = torch.zeros(b - a, dtype=torch.int32, device=inner.device)
        marks.index_add_(0, inside, torch.ones_like(inside, dtype=torch.int32))
        return marks.cumsum(0, dtype=torch.int32).add_((inner <= a).sum().to(torch.int32))

    def index_segments(self, index: torch.Tensor) -> torch.Tensor | None:
        """Segment id (int32 [c]) of local indices [c]."""
        if self.num_segments == 1:
            return None
        return (torch.searchsorted(self.offsets, index.to(torch.int64), right=True) - 1).to(torch.int32)

    def global_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Global positions (int64 [c]) of local indices [c]."""
        index = index.to(torch.int64)
        if self.runs.shape[0] == 1:
            return index + self.runs[0, 1]
        run = torch.searchsorted(self.runs[:, 0].contiguous(), index, right=True) - 1
        return self.runs[run, 1] + (index - self.runs[run, 0])


def _per_segment(values: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """values [S] broadcast to elements: values itself when there is one segment, else values[segments]."""
    return values if segments is None else values[segments]


def _pick_bins(counts: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per segment, the digit whose bin holds the need-th largest element: (digit, count above it, count in it)."""
    from_top = counts.view(-1, _BINS).flip(1)
    cumulative = from_top.cumsum(1)
    # Bins from the top whose cumulative count is still short of `need`; need = 0 picks the top bin (empty for
    # valid keys), so nothing is kept in that segment.
    j = (cumulative < need[:, None]).sum(1).clamp_(max=_BINS - 1)
    in_bin = from_top.gather(1, j[:, None]).squeeze(1)
    above = cumulative.gather(1, j[:, None]).squeeze(1) - in_bin
    return (_BINS - 1) - j, above, in_bin


def _sweep(
    keys: _SegmentedKeys,
    cand: _Candidates,
    prefix: torch.Tensor | None,
    shift: int,
    compact: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, _Candidates]:
    """One pass over `cand`: histogram the digit at `shift` of the elements whose key >> (shift + 8) equals their
    segment's prefix (all elements when prefix is None).

    Returns (local counts int64 [S * 256]; the survivors as an index list when `compact`, else `cand` unchanged:
    a later pass filters by a longer prefix anyway).
    """
    num_segments, device = keys.num_segments, keys.offsets.device
    compact = compact and prefix is not None
    # Without compaction, key >> shift minus (prefix * 256 - 1) is digit + 1 for matching keys and falls below 1
    # or above 256 otherwise: clamped, those land in two spare bins per segment, so filtering costs no extra pass.
    spare = 2 if prefix is not None and not compact else 0
    width = _BINS + spare
    if prefix is not None:
        # Clamped into the key dtype: prefixes that do not fit only arise for k = 0 (all-ones digits) and then
        # match nothing either way; comparing in int64 would promote every chunk.
        limit = torch.iinfo(keys.key_dtype).max
        base = ((prefix << 8) - 1).clamp(-1, limit).to(keys.key_dtype)
        wanted = prefix.clamp(max=limit).to(keys.key_dtype)
    counts = torch.zeros(num_segments * width, dtype=torch.int64, device=device)
    index_dtype = torch.int32 if keys.bounds[-1] <= _INT32_MAX else torch.int64
    survivors = []
    for a, b in cand.chunks(chunk_size):
        index, key, segments = keys.chunk(cand, a, b)
        if spare:
            bins = ((key >> shift) - _per_segment(base, segments)).clamp_(0, width - 1)
        else:
            if compact:
                local = torch.nonzero((key >> (shift + 8)) == _per_segment(wanted, segments)).squeeze(1)
                index = local + a if index is None else index[local]
                survivors.append(index.to(index_dtype))
                key = key[local]
                segments = None if segments is None else segments[local]
            bins = (key >> shift) & 0xFF
        bins = bins.to(torch.int32) if segments is None else segments * width + bins.to(torch.int32)
        counts += torch.bincount(bins, minlength=counts.numel())
    if compact:
        empty = torch.zeros(0, dtype=index_dtype, device=device)
        cand = _Candidates(cand.lo, cand.hi, torch.cat(survivors) if survivors else empty)
    if spare:
        counts = counts.view(num_segments, width)[:, 1 : _BINS + 1].reshape(-1)
    return counts, cand


def _extract_equal(keys: _SegmentedKeys, cand: _Candidates, threshold: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Local indices [t] of the candidates whose key equals their segment's threshold."""
    index_dtype = torch.int32 if keys.bounds[-1] <= _INT32_MAX else torch.int64
    # A threshold outside the key dtype (k = 0) matches nothing; clamping keeps it out of range.
    wanted = threshold.clamp(max=torch.iinfo(keys.key_dtype).max).to(keys.key_dtype)
    found = [torch.zeros(0, dtype=index_dtype, device=keys.offsets.device)]
    for a, b in cand.chunks(chunk_size):
        index, key, segments = keys.chunk(cand, a, b)
        local = torch.nonzero(key == _per_segment(wanted, segments)).squeeze(1)
        found.append((local + a if index is None else index[local]).to(index_dtype))
    return torch.cat(found)


def _radix_passes(
    keys: _SegmentedKeys,
    cand: _Candidates,
    need: torch.Tensor,
    shifts: tuple[int, ...],
    reduce: AllReduceSum,
    chunk_size: int,
    check_first: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _Candidates]:
    """Segmented radix select of the `need` [S] largest keys among `cand`, one 8-bit digit per shift.

    Returns (threshold key int64 [S], how many keys equal to the threshold to keep [S], global count equal to the
    threshold [S], global count above it [S], candidates: a superset of the local keys equal to the threshold).
    Each pass filters by the digits chosen so far and histograms the next digit in the same sweep; the candidates
    are compacted into an index list once few enough of them survive locally (a purely local choice).
    """
    num_segments = keys.num_segments
    threshold = torch.zeros(num_segments, dtype=torch.int64, device=keys.offsets.device)
    above_total = torch.zeros_like(threshold)
    in_bin = threshold
    prefix: torch.Tensor | None = None
    local_survivors = cand.numel()
    for pass_index, shift in enumerate(shifts):
        compact = local_survivors <= cand.numel() * _COMPACT_BELOW
        local_counts, cand = _sweep(keys, cand, prefix, shift, compact, chunk_size)
        counts = local_counts.clone()
        reduce(counts)
        if pass_index == 0:
            if check_first is not None:
                check_first(counts)
            # k larger than the global segment size keeps the whole segment.
            need = torch.minimum(need, counts.view(num_segments, _BINS).sum(1))
        digit, above, in_bin = _pick_bins(counts, need)
        local_survivors = int(local_counts.view(num_segments, _BINS).gather(1, digit[:, None]).sum())
        threshold = (threshold << 8) | digit
        above_total += above
        need = need - above
        prefix = threshold
    return threshold, need, in_bin, above_total, cand


def _validate(
    scores: torch.Tensor, segment_offsets: torch.Tensor, k: torch.Tensor | None, position_runs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Check shapes and dtypes; return (offsets int64 [S+1], k int64 [S], runs int64 [R, 2]) on scores' device."""
    if scores.dtype != torch.float32 or scores.dim() != 1 or not scores.is_contiguous():
        raise ValueError(
            f"scores must be a contiguous 1-d float32 tensor, got dtype={scores.dtype} shape={tuple(scores.shape)}"
        )
    device = scores.device
    offsets = segment_offsets.to(device=device, dtype=torch.int64)
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"segment_offsets must be int64 [S+1] with S >= 1, got shape {tuple(offsets.shape)}")
    bounds = offsets.tolist()
    if bounds[0] < 0 or bounds[-1] > scores.numel() or any(x > y for x, y in zip(bounds, bounds[1:])):
        raise ValueError(
            f"segment_offsets must be non-decreasing within [0, {scores.numel()}], got {bounds[:8]}"
            + ("..." if len(bounds) > 8 else "")
        )
    if offsets.numel() - 1 > (_INT32_MAX // _BINS):
        raise ValueError(f"at most {_INT32_MAX // _BINS} segments are supported, got {offsets.numel() - 1}")
    if k is not None:
        k = k.to(device=device, dtype=torch.int64).reshape(-1)
        if k.numel() != offsets.numel() - 1:
            raise ValueError(f"k must have one entry per segment ({offsets.numel() - 1}), got {k.numel()}")
        if bool((k < 0).any()):
            raise ValueError(f"k must be >= 0, got min {int(k.min())}")
    if position_runs is None:
        runs = torch.zeros(1, 2, dtype=torch.int64, device=device)
    else:
        runs = position_runs.to(device=device, dtype=torch.int64)
        if (
            runs.dim() != 2
            or runs.shape[1] != 2
            or runs.shape[0] == 0
            or int(runs[0, 0]) != 0
            or bool((runs[1:, 0] < runs[:-1, 0]).any())
        ):
            raise ValueError(
                "position_runs must be int64 [R, 2] rows (local_start, global_start) with local starts non-decreasing "
                f"from 0, got shape {tuple(runs.shape)}"
            )
        if bool((runs[:, 1] < 0).any()) or int(runs[:, 1].max()) + scores.numel() > _POSITION_LIMIT:
            raise ValueError(f"position_runs global starts must be >= 0 and positions < 2**40, got {runs.tolist()[:4]}")
    return offsets, k, runs


def _check_scores(scores: torch.Tensor, offsets: list[int], reduce: AllReduceSum) -> Callable[[torch.Tensor], None]:
    """Validation of the first-pass global histogram: same verdict on every rank, no extra pass in the usual case."""

    def check(counts: torch.Tensor) -> None:
        per_bin = counts.view(-1, _BINS)
        if bool(per_bin[:, _NEGATIVE_BINS].any()):
            raise ValueError("scores must be >= 0 (found negative values or -0.0, whose sign bit is set)")
        if bool(per_bin[:, _SUSPECT_BIN].any()):
            # Only scores >= 2**127, inf or NaN land here, so the extra NaN count (and its collective) is rare.
            nan_count = torch.isnan(scores[offsets[0] : offsets[-1]]).sum().reshape(1)
            reduce(nan_count)
            if int(nan_count) > 0:
                raise ValueError(f"scores must not be NaN (found {int(nan_count)})")

    return check


def _score_selection(
    scores: torch.Tensor,
    segment_offsets: torch.Tensor,
    k: torch.Tensor,
    position_runs: torch.Tensor | None,
    reduce: AllReduceSum,
    chunk_size: int,
) -> tuple[_SegmentedKeys, RadixThreshold, torch.Tensor, torch.Tensor | None]:
    """Radix select on the score bits, then on tie positions when needed.

    Returns (keys, thresholds, cut: int32 [S] bit pattern, local indices of further kept ties [t] or None): the
    kept set is {bits >= cut of the element's segment} plus those ties.
    """
    offsets, checked_k, runs = _validate(scores, segment_offsets, k, position_runs)
    assert checked_k is not None
    bits = scores.view(torch.int32)
    score_keys = _SegmentedKeys(lambda where: bits[where], torch.int32, offsets, runs)
    bounds = score_keys.bounds
    threshold, ties_needed, num_equal, num_greater, cand = _radix_passes(
        score_keys,
        _Candidates(bounds[0], bounds[-1]),
        checked_k,
        _SCORE_SHIFTS,
        reduce,
        chunk_size,
        check_first=_check_scores(scores, bounds, reduce),
    )
    # k = 0 walks down the all-ones digits: clamp such thresholds to an int32 pattern no finite score reaches (NaN).
    result = RadixThreshold(
        threshold.clamp(max=_INT32_MAX).to(torch.int32).view(torch.float32), num_greater, num_equal, ties_needed
    )
    above_threshold = (threshold + 1).clamp(max=_INT32_MAX).to(torch.int32)
    if not bool(((ties_needed > 0) & (ties_needed < num_equal)).any()):
        # Every segment keeps all of its ties or none: a single comparison per element decides.
        cut = torch.where(ties_needed > 0, result.threshold.view(torch.int32), above_threshold)
        return score_keys, result, cut, None
    # Some segment keeps only part of its ties: keep those with the lowest global positions, i.e. the largest
    # (limit - 1 - position), found by the same radix select on the tied elements. The condition is global, so
    # every rank takes this branch together.
    ties = _extract_equal(score_keys, cand, threshold, chunk_size)
    tie_cand = _Candidates(bounds[0], bounds[-1], ties)
    position_keys = _SegmentedKeys(
        lambda index: (_POSITION_LIMIT - 1) - score_keys.global_positions(index), torch.int64, offsets, runs
    )
    last, last_needed, _, _, _ = _radix_passes(
        position_keys, tie_cand, ties_needed, _POSITION_SHIFTS, reduce, chunk_size
    )
    kept = [ties[:0]]
    for a, b in tie_cand.chunks(chunk_size):
        index, tie_keys, tie_segments = position_keys.chunk(tie_cand, a, b)
        assert index is not None
        limit = _per_segment(last, tie_segments)
        # Positions are unique, so at most one tie equals `last`; it is kept when one more tie is still needed.
        keep = (tie_keys > limit) | ((tie_keys == limit) & (_per_segment(last_needed, tie_segments) > 0))
        kept.append(index[keep])
    return score_keys, result, above_threshold, torch.cat(kept)


def radix_select_threshold(
    scores: torch.Tensor,
    segment_offsets: torch.Tensor,
    k: torch.Tensor,
    *,
    position_runs: torch.Tensor | None = None,
    all_reduce_sum: AllReduceSum | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> RadixThreshold:
    """Per-segment k-th largest score and counts above/at it (all [S]) of float32 scores [n] >= 0, sharded or not.

    Arguments as for `select_top_k`.
    """
    return _score_selection(scores, segment_offsets, k, position_runs, all_reduce_sum or _no_reduce, chunk_size)[1]


def select_top_k(
    scores: torch.Tensor,
    segment_offsets: torch.Tensor,
    k: torch.Tensor,
    *,
    position_runs: torch.Tensor | None = None,
    all_reduce_sum: AllReduceSum | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> TopK:
    """Keep mask (bool [n]) of the k[s] largest scores per segment (ties: lowest global position) and thresholds [S].

    scores: float32 [n], >= 0 and not NaN: this rank's part of the scores.
    segment_offsets: int64 [S+1], local boundaries: segment s is scores[o[s]:o[s+1]]; elements outside
        [o[0], o[S]) (e.g. ZeRO padding) are never kept. A segment may be empty on this rank.
    k: int64 [S], global number to keep per segment (clamped to the global segment size).
    position_runs: int64 [R, 2] rows (local_start, global_start): local elements from local_start up to the next
        row's local_start have global positions global_start, global_start + 1, ...; global positions must be
        unique within a segment and < 2**40. None: global position = local index (one process).
    all_reduce_sum: in-place sum across ranks, called once per radix pass with S * 256 int64 counts (4 passes, plus
        5 only when a segment keeps part of its ties). None: one process.
    chunk_size: elements per chunk of the full-buffer passes (bounds the temporaries).
    """
    reduce = all_reduce_sum or _no_reduce
    keys, thresholds, cut, kept_ties = _score_selection(scores, segment_offsets, k, position_runs, reduce, chunk_size)
    bits = scores.view(torch.int32)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    for a, b in _Candidates(keys.bounds[0], keys.bounds[-1]).chunks(chunk_size):
        torch.ge(bits[a:b], _per_segment(cut, keys.range_segments(a, b)), out=keep[a:b])
    if kept_ties is not None:
        keep[kept_ties] = True
    return TopK(keep, thresholds)


def relative_rank(
    scores: torch.Tensor,
    segment_offsets: torch.Tensor,
    *,
    all_reduce_sum: AllReduceSum | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Relative rank in [0, 1] (float32 [n]) of each score within its segment, 1 = largest, from the top 16 bits.

    r = (number of smaller scores) / (segment size - 1), where scores that share their top 16 bits (sign, exponent
    and 7 mantissa bits: a relative resolution of 2**-7) all get the mean rank of that bucket, as equal scores do in
    an average-rank convention. A segment of one element gets rank 1; elements outside [o[0], o[S]) get 0.
    Two histogram passes (S * 256, then 256 per occupied top-byte bin, communicated with `all_reduce_sum`).
    Arguments as for `select_top_k`.
    """
    reduce = all_reduce_sum or _no_reduce
    offsets, _, runs = _validate(scores, segment_offsets, None, None)
    num_segments = offsets.numel() - 1
    bits = scores.view(torch.int32)
    keys = _SegmentedKeys(lambda where: bits[where], torch.int32, offsets, runs)
    full = _Candidates(keys.bounds[0], keys.bounds[-1])

    def top_bins(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(segment * 256 + top byte int64 [b - a], segment ids, key bits) of a chunk."""
        _, key, segments = keys.chunk(full, a, b)
        # Logical shift: negative scores land in bins 128..255, where the check below reports them.
        top = ((key >> 24) & 0xFF).to(torch.int64)
        return (top if segments is None else segments * _BINS + top), segments, key

    counts1 = torch.zeros(num_segments * _BINS, dtype=torch.int64, device=scores.device)
    for a, b in full.chunks(chunk_size):
        counts1 += torch.bincount(top_bins(a, b)[0], minlength=counts1.numel())
    reduce(counts1)
    _check_scores(scores, keys.bounds, reduce)(counts1)
    # Second digit only inside occupied (segment, top byte) bins: a dense id per occupied bin keeps this histogram
    # small for many segments (S * 65536 bins would not be).
    dense = counts1.gt(0).cumsum(0) - 1
    num_occupied = int(dense[-1]) + 1
    counts2 = torch.zeros(num_occupied * _BINS, dtype=torch.int64, device=scores.device)
    for a, b in full.chunks(chunk_size):
        top, _, key = top_bins(a, b)
        counts2 += torch.bincount(dense[top] * _BINS + ((key >> 16) & 0xFF), minlength=counts2.numel())
    reduce(counts2)

    def above(counts: torch.Tensor) -> torch.Tensor:
        """Count in strictly higher bins of the same 256-bin group, per bin (int64 like counts)."""
        grouped = counts.view(-1, _BINS)
        return (grouped.flip(1).cumsum(1).flip(1) - grouped).reshape(-1)

    above1, above2 = above(counts1), above(counts2)
    sizes = counts1.view(num_segments, _BINS).sum(1)
    ranks = torch.zeros(scores.numel(), dtype=torch.float32, device=scores.device)
    for a, b in full.chunks(chunk_size):
        top, segments, key = top_bins(a, b)
        bucket = dense[top] * _BINS + ((key >> 16) & 0xFF)
        greater = above1[top] + above2[bucket]
        size = _per_segment(sizes, segments)
        # Mean ascending rank of the bucket = smaller + (equal - 1) / 2, over size - 1 (doubled to stay integral).
        doubled = 2 * (size - greater) - counts2[bucket] - 1
        rank = doubled.to(torch.float64) / (2 * (size - 1)).clamp(min=1).to(torch.float64)
        ranks[a:b] = torch.where(size > 1, rank, 1.0)
    return ranks


def _no_reduce(counts: torch.Tensor) -> None:
    """Single process: the local counts are the global counts."""


# --- ordered shards: two 16-bit passes, no host reads -----------------------------------------------------------------

_HISTOGRAM_BUDGET_BITS = 20
"""S * 2**w counts per pass at most (8 MiB of int64): w = 16 up to 16 segments, fewer bits per pass beyond."""
_LITTLE_ENDIAN = sys.byteorder == "little"


def digit_widths(num_segments: int) -> tuple[int, ...]:
    """Bits per radix pass over the 32-bit keys: 16 + 16 for up to 16 segments, narrower digits for more (so that
    each pass's S * 2**w histogram stays within 2**20 counts)."""
    width = max(4, min(16, _HISTOGRAM_BUDGET_BITS - max(0, num_segments - 1).bit_length()))
    widths, left = [], 32
    while left > 0:
        widths.append(min(width, left))
        left -= widths[-1]
    return tuple(widths)


def _histogram(keys: torch.Tensor, bins: int, fixed_shapes: bool) -> torch.Tensor:
    """Counts (int64 [bins]) of integer keys in [0, bins). `torch.bincount` on the host (fast, but on a GPU it
    reads the largest key back to size its output), `index_add_` otherwise (no host synchronization)."""
    if not fixed_shapes:
        return torch.bincount(keys, minlength=bins)
    counts = torch.zeros(bins, dtype=torch.int64, device=keys.device)
    return counts.index_add_(0, keys.to(torch.int32), torch.ones(keys.numel(), dtype=torch.int64, device=keys.device))


def _top_digits(bits: torch.Tensor, scores: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The top 16 bits (sign bit cleared, int16 or int32 [b - a]) of scores[a:b]: a strided int16 view on
    little-endian machines (no shift pass)."""
    if _LITTLE_ENDIAN:
        return torch.bitwise_and(scores.view(torch.int16)[2 * a + 1 : 2 * b : 2], 0x7FFF)
    return (bits[a:b] >> 16) & 0x7FFF


def _digit(values: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    """(values >> shift) & (2**width - 1), on int32 bit patterns (the sign bit becomes part of the top digit)."""
    return (values >> shift) & ((1 << width) - 1)


def select_top_k_ordered(
    scores: torch.Tensor,
    bounds: list[int],
    k: torch.Tensor,
    *,
    all_reduce_sum: AllReduceSum | None = None,
    rank: int = 0,
    world: int = 1,
    fixed_shapes: bool | None = None,
    validate: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    out: torch.Tensor | None = None,
) -> TopK:
    """`select_top_k` for *ordered* shards, in two 16-bit radix passes and without reading a value into Python.

    Ordered shards: within each segment the local elements are in increasing global position, and every element of
    rank r comes before those of rank r + 1 (one process; or each rank holding a contiguous slice of one canonical
    buffer, as the split DDP masker does). Then a tie's place in position order is its place among the local ties
    plus the ties of the lower ranks, and the kept set is exactly `select_top_k`'s.

    scores: float32 [n], >= 0 (negative scores are not detected; NaN and inf only with `validate`).
    bounds: local segment boundaries [S+1] as Python ints (segment s is scores[bounds[s]:bounds[s+1]]).
    k: int64 [S] (on scores' device), global keep counts (clamped to the global segment size).
    all_reduce_sum: the cross-rank sum (None: one process): one call per pass with S * 2**w counts, plus one of
        world * S counts for the ties' rank offsets when world > 1.
    fixed_shapes: no data-dependent shapes (no candidate lists, no `bincount`, no `nonzero`): the way to run on a
        GPU without host synchronization; None picks it for non-CPU tensors. Otherwise (CPU) the elements left after
        the first pass become index lists, which makes the later passes cheap.
    validate: fail on NaN or inf scores (reads one count back: a host synchronization on a GPU).
    out: a buffer [n] for the keep mask, bool, or uint8 / floating (then 1 = keep, 0 = drop; floats are ready to
        multiply gradients by); reused across steps, it saves allocating and zeroing one.

    The first pass histograms the top 16 bits of every score (per segment), the second the low 16 bits of the
    scores in the chosen bin; for more than 16 segments the digits narrow (`digit_widths`). Thresholds, counts and
    the keep mask stay on the device.
    """
    if scores.dtype != torch.float32 or scores.dim() != 1 or not scores.is_contiguous():
        raise ValueError(
            f"scores must be a contiguous 1-d float32 tensor, got dtype={scores.dtype} shape={tuple(scores.shape)}"
        )
    num_segments = len(bounds) - 1
    if (
        num_segments < 1
        or bounds[0] < 0
        or bounds[-1] > scores.numel()
        or any(x > y for x, y in zip(bounds, bounds[1:]))
    ):
        raise ValueError(f"bounds must be non-decreasing within [0, {scores.numel()}], got {bounds[:8]}")
    device = scores.device
    if k.numel() != num_segments:
        raise ValueError(f"k must have one entry per segment ({num_segments}), got {k.numel()}")
    fixed = device.type != "cpu" if fixed_shapes is None else fixed_shapes
    reduce = all_reduce_sum or _no_reduce
    bits = scores.view(torch.int32)
    segments = [(s, bounds[s], bounds[s + 1]) for s in range(num_segments) if bounds[s + 1] > bounds[s]]
    widths = digit_widths(num_segments)
    need = k.to(device=device, dtype=torch.int64).reshape(-1)
    threshold = torch.zeros(num_segments, dtype=torch.int64, device=device)
    num_greater = torch.zeros_like(threshold)
    # Compact mode: per segment, the local indices (relative to the segment start) still matching the digits so far.
    candidates: dict[int, torch.Tensor] = {}
    left = 32
    local_counts = threshold
    for pass_index, width in enumerate(widths):
        shift = left - width
        bins = 1 << width
        counts = torch.zeros(num_segments, bins, dtype=torch.int64, device=device)
        for s, a, b in segments:
            if pass_index == 0:
                for c in range(a, b, chunk_size):
                    d = min(c + chunk_size, b)
                    keys = _top_digits(bits, scores, c, d) if width == 16 else _digit(bits[c:d], shift, width)
                    counts[s] += _histogram(keys, bins, fixed)
            elif not fixed:
                counts[s] += _histogram(_digit(bits[a:b][candidates[s]], shift, width), bins, False)
            else:
                prefix = threshold[s]
                for c in range(a, b, chunk_size):
                    chunk = bits[c : min(c + chunk_size, b)]
                    match = _digit(chunk, left, 32 - left) == prefix
                    # Non-matching elements go to a spare last bin, dropped below.
                    keys = torch.where(match, _digit(chunk, shift, width), bins)
                    counts[s] += _histogram(keys, bins + 1, True)[:bins]
        local_counts = counts
        counts = counts.clone() if world > 1 else counts
        reduce(counts)
        if pass_index == 0:
            if validate:
                _check_finite(counts, width)
            need = torch.minimum(need, counts.sum(1))  # k beyond the global segment size keeps the whole segment
        digit, above, num_equal = _pick_digits(counts, need)
        threshold = (threshold << width) | digit
        num_greater = num_greater + above
        need = need - above
        left = shift
        if not fixed:
            for s, a, b in segments:
                candidates[s] = _filter_candidates(scores, bits, a, b, candidates.get(s), digit[s], width, left)
    # need = how many scores equal to the threshold each segment keeps, in position order across ranks.
    cut = threshold.to(torch.int32)  # the bit pattern (wraps above 2**31 - 1: only for k = 0, matching nothing)
    cut_value = cut.view(torch.float32)
    offsets = torch.zeros(num_segments, dtype=torch.int64, device=device)
    if world > 1:
        local_ties = local_counts.gather(1, digit[:, None]).squeeze(1)  # local scores equal to the threshold
        table = torch.zeros(world, num_segments, dtype=torch.int64, device=device)
        table[rank] = local_ties
        reduce(table)
        offsets = table[:rank].sum(0)
    allowed = need - offsets  # local ties this rank may keep (may be <= 0)
    if out is None:
        keep = torch.zeros(scores.numel(), dtype=torch.bool, device=device)
    else:
        if (
            not (out.dtype in (torch.bool, torch.uint8) or out.is_floating_point())
            or out.shape != scores.shape
            or out.device != device
        ):
            raise ValueError(f"out must be a bool, uint8 or floating tensor shaped {tuple(scores.shape)} on {device}")
        keep = out
        keep[: bounds[0]] = False
        keep[bounds[-1] :] = False
    for s, a, b in segments:
        for c in range(a, b, chunk_size):
            d = min(c + chunk_size, b)
            torch.gt(scores[c:d], cut_value[s], out=keep[c:d])  # strictly above (non-negative floats order as bits)
        if not fixed:
            ties = candidates[s]  # ascending local indices of the scores equal to the threshold
            order = torch.arange(1, ties.numel() + 1, device=device)
            keep[a:b][ties[order <= allowed[s]]] = 1
        else:
            carry = torch.zeros((), dtype=torch.int64, device=device)
            for c in range(a, b, chunk_size):
                d = min(c + chunk_size, b)
                equal = bits[c:d] == cut[s]
                order = equal.cumsum(0) + carry
                carry = order[-1]
                keep[c:d].masked_fill_(equal & (order <= allowed[s]), True)
    return TopK(keep, RadixThreshold(cut_value.clone(), num_greater, num_equal, need.clamp(min=0)))


def _pick_digits(counts: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_pick_bins` for [S, bins] counts of any width: per segment the digit whose bin holds the need-th largest
    element (the top digit when need = 0), the count above that bin and the count in it (no flip of the counts)."""
    cumulative = counts.cumsum(1)
    above_or_in = cumulative[:, -1:] - cumulative + counts  # elements in this bin or above, per bin (non-increasing)
    digit = ((above_or_in >= need[:, None]).sum(1) - 1).clamp_(min=0)
    in_bin = counts.gather(1, digit[:, None]).squeeze(1)
    above = cumulative[:, -1] - cumulative.gather(1, digit[:, None]).squeeze(1)
    return digit, above, in_bin


def _filter_candidates(
    scores: torch.Tensor,
    bits: torch.Tensor,
    a: int,
    b: int,
    previous: torch.Tensor | None,
    digit: torch.Tensor,
    width: int,
    left: int,
) -> torch.Tensor:
    """Local indices (relative to a, ascending) of segment [a, b) whose digit of this pass equals `digit`."""
    if previous is None:
        found = []
        for c in range(a, b, DEFAULT_CHUNK):
            d = min(c + DEFAULT_CHUNK, b)
            if width == 16 and _LITTLE_ENDIAN:
                # The raw top halves: a set sign bit makes them negative, never equal to a digit (< 2**15).
                keys = scores.view(torch.int16)[2 * c + 1 : 2 * d : 2]
            else:
                keys = _top_digits(bits, scores, c, d) if width == 16 else _digit(bits[c:d], left, width)
            found.append(torch.nonzero(keys == digit).squeeze(1) + (c - a))
        return torch.cat(found)
    return previous[_digit(bits[a:b][previous], left, width) == digit]


def _check_finite(counts: torch.Tensor, width: int) -> None:
    """Fail when the first pass's global counts hold NaN or inf (exponent all ones; with digits narrower than 16
    bits also negative values); one host read."""
    first_suspect = 0x7F80 >> (16 - width) if width <= 16 else 0x7F80 << (width - 16)
    if bool(counts[:, first_suspect:].any()):
        raise ValueError("scores must be finite and >= 0 (found NaN, inf or a negative value)")
