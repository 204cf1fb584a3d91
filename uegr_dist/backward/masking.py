"""UEGR's selective update (docs/design.md §1.5): keep the most salient rho fraction of gradient coordinates, zero
the rest.

`GradientMasker` scores every covered coordinate (saliency.py), selects per segment (one segment for scope
"global", one per tensor, or one per transformer layer) and multiplies the gradients by the mask in place. The
selection itself lives in radix_select.py and takes the collective hooks a sharded (ZeRO) run needs; this class
is the single-process driver on whole parameters.

Layout: the scores of all covered parameters live in one flat fp32 buffer ordered by segment, then by the
canonical (optimizer) order, so every segment is contiguous even when the optimizer interleaves layers (decay /
no-decay groups). Each coordinate's *global position* is its offset in the canonical order of the covered
parameters; it breaks ties (lowest first) and keys the soft mask's random numbers, so neither depends on layout.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from uegr_dist.backward.radix_select import (
    DEFAULT_CHUNK,
    AllReduceSum,
    relative_rank,
    select_top_k,
    select_top_k_ordered,
)
from uegr_dist.backward.saliency import SaliencyScorer, check_saliency
from uegr_dist.rng import keyed_uniform_flat, mix_key

if TYPE_CHECKING:
    from uegr_dist.config import MaskConfig

SCOPES = ("global", "per_layer", "per_tensor")
MASK_KINDS = ("hard", "soft")
_LITTLE_ENDIAN = sys.byteorder == "little"
_LAYER = re.compile(r"(?:^|\.)layers?\.\d+(?=\.)")
_SOFT_MASK_STREAM = 0x6D61736B  # keeps the soft mask's numbers apart from other users of the same seed and step


class MaskStats:
    """What one `GradientMasker.apply_` kept. Counts and thresholds computed on the device stay there until read:
    `kept`, `mean_threshold` and `keep_fraction` read them (a host synchronization on a GPU); `lazy_keep_fraction`
    does not."""

    def __init__(
        self, kept: int | torch.Tensor, total: int, num_segments: int, mean_threshold: float | torch.Tensor
    ) -> None:
        self._kept = kept
        self.total = total
        """Covered coordinates."""
        self.num_segments = num_segments
        self._mean_threshold = mean_threshold

    @property
    def kept(self) -> int:
        """Covered coordinates kept (updated this step)."""
        return int(self._kept)

    @property
    def mean_threshold(self) -> float:
        """Hard masks: mean over segments of the smallest kept score (the k-th largest); soft masks: NaN."""
        return float(self._mean_threshold)

    @property
    def keep_fraction(self) -> float:
        """kept / total."""
        return self.kept / max(self.total, 1)

    @property
    def lazy_keep_fraction(self) -> float | torch.Tensor:
        """kept / total without a read: a float when the count is known on the host (hard masks), else a 0-dim
        tensor to read when logging."""
        if isinstance(self._kept, torch.Tensor):
            return self._kept.double() / max(self.total, 1)
        return self._kept / max(self.total, 1)

    def __repr__(self) -> str:
        return (
            f"MaskStats(kept={self._kept}, total={self.total}, num_segments={self.num_segments}, "
            f"mean_threshold={self._mean_threshold})"
        )


class MaskLayout(NamedTuple):
    """Where this rank's covered coordinates sit: the local score buffer [n] in segment order, in runs of
    consecutive global (canonical) positions."""

    segment_offsets: torch.Tensor
    """int64 [S+1]: segment s is buffer[o[s]:o[s+1]]."""
    position_runs: torch.Tensor
    """int64 [R, 2]: (local start, global start) of each run."""
    run_sizes: list[int]
    """Elements of each run [R]."""

    def local_values(self, full: torch.Tensor) -> torch.Tensor:
        """The entries of a canonical-order vector full [total] that this rank's buffer holds ([n], buffer order)."""
        pieces = [
            full[position : position + size] for (_, position), size in zip(self.position_runs.tolist(), self.run_sizes)
        ]
        return torch.cat(pieces) if pieces else full[:0]


class MaskSelector(Protocol):
    """A method's own choice of the kept coordinates (instead of the hard / soft saliency top-rho).

    Called once per optimizer step with this rank's scores (float32 [n], the masker's saliency of the reduced
    gradient, in `layout` order), the step and the cross-rank sum (None in one process, or when every rank holds all
    coordinates). Returns keep (bool [n]) and a gradient multiplier (float32 [n], 0 where not kept) or None (the
    gradient is multiplied by keep). Every rank must get the same answer for the same global position.
    """

    def __call__(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def segment_names(names: Sequence[str], scope: str) -> list[str]:
    """The segment each parameter name belongs to under `scope` (one string per name).

    "global": one segment. "per_tensor": one per name. "per_layer": parameters of one transformer layer (a name
    containing `layer.<i>.` or `layers.<i>.`) share the segment named by the prefix up to the index, e.g.
    "roberta.encoder.layer.3"; every other parameter belongs to its shortest module prefix that contains no layer,
    e.g. "roberta.embeddings", "roberta.pooler", "classifier" (a top-level parameter: its own name).
    """
    _check_scope(scope)
    if scope == "global":
        return ["global"] * len(names)
    if scope == "per_tensor":
        return list(names)
    layers = [_LAYER.search(name) for name in names]
    containers = set()
    for match in layers:
        if match is not None:
            stack = match.string[: match.end()].split(".")[:-1]  # path up to "layer", without the index
            containers.update(".".join(stack[:i]) for i in range(1, len(stack) + 1))
    segments = []
    for name, match in zip(names, layers):
        if match is not None:
            segments.append(name[: match.end()])
            continue
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        segments.append(next(prefix for prefix in prefixes if prefix not in containers))
    return segments


def keep_count(ratio: float, numel: int) -> int:
    """k = max(1, ceil(ratio * numel)) (0 for an empty segment), with ratio read as the decimal it prints as."""
    # Fraction(str(...)) makes ceil(0.3 * 10) = 3, where float arithmetic gives ceil(3.0000000000000004) = 4.
    return min(numel, max(1, math.ceil(Fraction(str(float(ratio))) * numel)))


def exclude_patterns(exclude: Sequence[str]) -> list[re.Pattern[str]]:
    """The compiled `exclude` regexes; fails naming the pattern that does not compile."""
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"exclude pattern {pattern!r} is not a valid regex: {error}") from error
    return patterns


@dataclass(frozen=True)
class MaskOptions:
    """Which gradient coordinates a masker keeps; `GradientMasker` and `ZeroGradientMasker` take the same options.

    ratio: rho in (0, 1]; every segment keeps max(1, ceil(rho * size)) coordinates (hard) or about that fraction in
    expectation (soft). scope: the segments, "global", "per_layer" or "per_tensor" (`segment_names`). kind: "hard"
    (exact top-k) or "soft" (RoAST-style Bernoulli mask, see `GradientMasker`). saliency, ema_beta: the score
    (`SaliencyScorer`). soft_temperature: T of the soft keep probability. exclude: regexes (`re.search` on the
    parameter name) of parameters that are never masked; stored as a tuple. seed: keys the soft mask's random
    numbers. selector: a method's own keep rule (`MaskSelector`), replacing hard / soft selection; it may also
    rescale the kept gradients. include: a regex (`re.search`) that a masked parameter's name must match (None: every
    parameter not excluded). freeze_masked: the optimizer leaves dropped coordinates alone (value and Adam moments
    unchanged: UEGR's selective update); False: only their gradient is zeroed (and the kept ones rescaled), and the
    optimizer steps every coordinate with its moments ("mask before the Adam moments", ChildTuning / RoAST).

    Every option is checked here, once: a bad value raises ValueError naming the option (the `method.mask` config
    key of the same name), the value and what is allowed.
    """

    ratio: float = 0.3
    scope: str = "global"
    kind: str = "hard"
    saliency: str = "taylor"
    ema_beta: float = 0.9
    soft_temperature: float = 10.0
    exclude: Sequence[str] = ()
    seed: int = 0
    selector: MaskSelector | None = None
    include: str | None = None
    freeze_masked: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))  # a config's list must not change under the masker
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        _check_scope(self.scope)
        if self.kind not in MASK_KINDS:
            raise ValueError(f"kind must be one of {MASK_KINDS}, got {self.kind!r}")
        check_saliency(self.saliency, self.ema_beta)
        if not self.soft_temperature > 0.0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        exclude_patterns(self.exclude)
        if self.include is not None:
            exclude_patterns([self.include])

    @classmethod
    def from_config(cls, mask: MaskConfig, *, seed: int, selector: MaskSelector | None = None) -> MaskOptions:
        """The options of a `method.mask` config: every field but the on/off switch `enabled`, plus the run's seed."""
        fields = {f.name: getattr(mask, f.name) for f in dataclasses.fields(mask) if f.name != "enabled"}
        return cls(**fields, seed=seed, selector=selector)


def covered_parameters(
    named_params: Sequence[tuple[str, torch.nn.Parameter]], options: MaskOptions
) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs a mask covers, in the given order: trainable, matching `options.include` (when
    set) and no `options.exclude` regex."""
    patterns = exclude_patterns(options.exclude)
    include = None if options.include is None else re.compile(options.include)
    if len({id(param) for _, param in named_params}) != len(named_params):
        raise ValueError("named_params lists the same parameter twice")
    covered = [
        (name, param)
        for name, param in named_params
        if param.requires_grad
        and (include is None or include.search(name))
        and not any(p.search(name) for p in patterns)
    ]
    if not covered:
        if include is not None and not any(p.requires_grad and include.search(n) for n, p in named_params):
            raise ValueError(f"include pattern {options.include!r} matches no trainable parameter")
        raise ValueError("no parameter to mask: every parameter is excluded or frozen")
    return covered


def soft_keep_mask(
    scores: torch.Tensor,
    segment_offsets: torch.Tensor,
    position_runs: torch.Tensor,
    run_sizes: Sequence[int],
    ratio: float,
    soft_temperature: float,
    seed: int,
    step: int,
    *,
    all_reduce_sum: AllReduceSum | None = None,
) -> torch.Tensor:
    """Soft keep mask (bool [n]) of scores [n]: Bernoulli(sigmoid(2 T (rank - (1 - ratio)))), keyed by position.

    position_runs [R, 2] (local start, global start) with run_sizes [R] elements each cover scores; the uniform
    numbers are keyed by (seed, step, global position), so a shard draws what one process draws for the same
    coordinates. all_reduce_sum: as for `relative_rank` (None: one process).
    """
    keep_prob = relative_rank(scores, segment_offsets, all_reduce_sum=all_reduce_sum)
    keep_prob.sub_(1.0 - ratio).mul_(2.0 * soft_temperature).sigmoid_()
    key = mix_key(seed, _SOFT_MASK_STREAM, step)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    for (start, position), size in zip(position_runs.tolist(), run_sizes):
        uniform = keyed_uniform_flat(key, position, size, device=scores.device)
        torch.lt(uniform, keep_prob[start : start + size], out=keep[start : start + size])
    return keep


def select_coordinates(
    options: MaskOptions,
    scores: torch.Tensor,
    layout: MaskLayout,
    k: torch.Tensor,
    step: int,
    *,
    all_reduce_sum: AllReduceSum | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
    """One step's choice among the covered coordinates of scores [n] (this rank's, in `layout` order).

    Returns keep (bool [n]), the gradient multiplier (float32 [n], from a selector that rescales; else None) and the
    mean over segments of the hard threshold (a 0-dim tensor, not read here; NaN for soft masks and selectors).
    k: int64 [S] keep counts per segment (hard masks). all_reduce_sum: the cross-rank sum (None in one process).
    `options.selector` decides when given, else the hard top-k (`select_top_k`) or the soft Bernoulli mask
    (`soft_keep_mask`).
    """
    if options.selector is not None:
        keep, multiplier = options.selector(scores, layout, step, all_reduce_sum)
        return keep, multiplier, math.nan
    if options.kind == "hard":
        keep, thresholds = select_top_k(
            scores, layout.segment_offsets, k, position_runs=layout.position_runs, all_reduce_sum=all_reduce_sum
        )
        return keep, None, thresholds.threshold.nanmean()
    keep = soft_keep_mask(
        scores,
        layout.segment_offsets,
        layout.position_runs,
        layout.run_sizes,
        options.ratio,
        options.soft_temperature,
        options.seed,
        step,
        all_reduce_sum=all_reduce_sum,
    )
    return keep, None, math.nan


@dataclass(frozen=True)
class SplitMasking:
    """How processes that each hold the whole averaged gradient (DDP) share the mask's work: process `rank` of
    `world` scores and selects the coordinates [rank * m, rank * m + m) of the masker's buffer (m = ceil(total /
    world), rounded up to a multiple of 8), the thresholds come from all-reduced histograms, and the kept sets are
    all-gathered, as bits (`packed`) or bytes. Exactly the one-process mask (`select_top_k_ordered`)."""

    rank: int
    world: int
    all_reduce_sum: AllReduceSum
    all_gather: Callable[[torch.Tensor, torch.Tensor], None]
    """all_gather(output [world * c], input [c]): every rank's input, in rank order, into every rank's output."""
    packed: bool = True


class GradientMasker:
    """Saliency top-rho gradient mask over named parameters (hard top-k or RoAST-style soft Bernoulli mask).

    named_params: in the canonical (optimizer) order. options: what to keep (`MaskOptions`). Parameters matching
    an `exclude` regex or with requires_grad False are never masked; every segment keeps max(1, ceil(rho * size))
    coordinates (hard) or about that fraction in expectation (soft, see below).
    kind "soft": relative rank r in [0, 1] within the segment (1 = most salient; 16-bit radix resolution, see
    `relative_rank`), keep probability sigmoid(2 * soft_temperature * (r - (1 - ratio))), Bernoulli draws keyed
    by (seed, step, global position) so they are reproducible and independent of sharding. No 1/p rescaling.
    Equal scores share their mean rank instead of being ordered arbitrarily, so a segment with many exact ties (zero
    gradients of unused embedding rows) keeps fewer than rho of its coordinates in expectation; hard masks keep
    exactly k, splitting ties by position. A `selector` replaces hard / soft selection.

    Hard masks without a selector take the fast path (`select_top_k_ordered`): two 16-bit radix passes, the keep
    mask as 0 / 1 floats (the gradients are multiplied by it and the optimizer takes it as its update mask), and no
    value read into Python, so a step with it needs no host synchronization. split: several DDP processes share
    that work (`SplitMasking`; fast path only). fixed_shapes: as in `select_top_k_ordered` (None: by device).
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        options: MaskOptions,
        *,
        split: SplitMasking | None = None,
        fixed_shapes: bool | None = None,
    ) -> None:
        self.options = options
        self.scorer = SaliencyScorer(options.saliency, ema_beta=options.ema_beta)
        covered = covered_parameters(named_params, options)
        devices = {param.device for _, param in covered}
        if len(devices) > 1:
            raise ValueError(f"all masked parameters must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()

        canonical_starts = [0]
        for _, param in covered:
            canonical_starts.append(canonical_starts[-1] + param.numel())
        segments = segment_names([name for name, _ in covered], options.scope)
        segment_order = {segment: i for i, segment in enumerate(dict.fromkeys(segments))}
        layout = sorted(range(len(covered)), key=lambda i: (segment_order[segments[i]], i))
        self.names = [covered[i][0] for i in layout]
        self.params = [covered[i][1] for i in layout]

        sizes = [0] * len(segment_order)
        runs = []
        start = 0
        for i in layout:
            runs.append((start, canonical_starts[i]))
            sizes[segment_order[segments[i]]] += covered[i][1].numel()
            start += covered[i][1].numel()
        self.total = start
        # Selection metadata: segment boundaries [S+1] and keep counts [S] in the layout, (layout start, canonical
        # start) per parameter [P, 2].
        self.bounds = [0, *itertools.accumulate(sizes)]
        self.segment_offsets = torch.tensor(self.bounds, dtype=torch.int64, device=self.device)
        keep_counts = [keep_count(options.ratio, size) for size in sizes]
        self.k = torch.tensor(keep_counts, dtype=torch.int64, device=self.device)
        self.position_runs = torch.tensor(runs, dtype=torch.int64, device=self.device)
        self.layout = MaskLayout(self.segment_offsets, self.position_runs, [param.numel() for param in self.params])
        self.fast = options.selector is None and options.kind == "hard"
        self.fixed_shapes = fixed_shapes
        self.kept_total = sum(min(k, size) for k, size in zip(keep_counts, sizes))
        """Coordinates a hard mask keeps (known without counting)."""
        self.split = split if split is not None and split.world > 1 and self.fast else None
        # The part of the buffer this process scores and selects: all of it, or its slice [lo, hi).
        if self.split is None:
            self.lo, self.hi, width = 0, self.total, self.total
        else:
            width = -(-self.total // self.split.world)
            width += -width % 8  # whole bytes of packed bits
            self.lo = min(self.total, self.split.rank * width)
            self.hi = min(self.total, self.lo + width)
        self.local_bounds = [min(max(b, self.lo), self.hi) - self.lo for b in self.bounds]
        # Per covered parameter, the piece of it in this process's slice: (index, start in the parameter, length).
        self._pieces = []
        for index, (layout_start, param) in enumerate(
            zip(itertools.accumulate([0, *self.layout.run_sizes]), self.params)
        ):
            a, b = max(layout_start, self.lo), min(layout_start + param.numel(), self.hi)
            if a < b:
                self._pieces.append((index, a - layout_start, b - a))
        self.scores = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=self.device)
        if self.split is None:
            self.score_views = self._views(self.scores)
        else:
            self.score_views = list(self.scores.split([n for _, _, n in self._pieces]))
        # The fast path's keep mask, 0 / 1 floats over the whole buffer (under split: the gathered slices, padded).
        self._keep: torch.Tensor | None = None
        self._local: torch.Tensor | None = None
        self._pack_scratch: list[torch.Tensor] | None = None
        self._width = width
        self._mask: torch.Tensor | None = None
        self.last_stats: MaskStats | None = None
        """What the last `apply_` kept."""
        self.step = 0
        """Index of the next step (keys soft masks and selectors); counts `apply_` calls unless given."""

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat [N] buffer shaped like each covered parameter, in layout order."""
        views, start = [], 0
        for param in self.params:
            views.append(flat[start : start + param.numel()].view(param.shape))
            start += param.numel()
        return views

    def _local_keep(self) -> torch.Tensor:
        """Under split: this process's slice of the keep mask as bytes [width] (0 past the end), kept across steps."""
        if self._local is None:
            self._local = torch.zeros(self._width, dtype=torch.uint8, device=self.device)
        return self._local

    def _keep_buffer(self) -> torch.Tensor:
        """The fast path's float keep buffer (allocated once; [world * width] under split)."""
        if self._keep is None:
            size = self.total if self.split is None else self.split.world * self._width
            self._keep = torch.zeros(size, dtype=torch.float32, device=self.device)
        return self._keep

    @torch.no_grad()
    def apply_(self, step: int | None = None, *, gate: torch.Tensor | None = None, validate: bool = False) -> MaskStats:
        """Score the current gradients, build step `step`'s mask (default: the masker's own step count) and zero the
        gradients of the dropped coordinates.

        gate: a 0-dim bool tensor, False when the step will not update anything (a non-finite step skipped on the
        device): the fisher_ema saliency state then stays as it was. validate: fail on NaN or inf scores (the fast
        path reads one count back for it; the other paths always check)."""
        step = self.step if step is None else step
        self.step = step + 1
        grads = [param.grad for param in self.params]
        if self.split is None:
            scores = self.scorer.score_(self.scores, self.score_views, self.params, grads, gate=gate)
        else:
            params = [self.params[i].detach().reshape(-1)[a : a + n] for i, a, n in self._pieces]
            parts = [None if grads[i] is None else grads[i].reshape(-1)[a : a + n] for i, a, n in self._pieces]
            scores = self.scorer.score_(self.scores, self.score_views, params, parts, gate=gate)
        if self.fast:
            keep = self._keep_buffer()
            split = self.split
            top = select_top_k_ordered(
                scores,
                self.local_bounds,
                self.k,
                all_reduce_sum=None if split is None else split.all_reduce_sum,
                rank=0 if split is None else split.rank,
                world=1 if split is None else split.world,
                fixed_shapes=self.fixed_shapes,
                validate=validate,
                # Bounded temporaries; on a GPU larger chunks mean fewer kernel launches.
                chunk_size=DEFAULT_CHUNK if self.device.type == "cpu" else 1 << 24,
                out=keep[: self.total] if split is None else self._local_keep()[: self.hi - self.lo],
            )
            if split is not None:
                if self._pack_scratch is None:
                    self._pack_scratch = [torch.empty(_PACK_CHUNK, dtype=torch.int64, device=self.device) for _ in "ab"]
                _gather_keep(keep, self._local_keep(), split, self._pack_scratch)
            self._mask = keep[: self.total]
            factors = self._views(self._mask)
            present = [(grad, factor) for grad, factor in zip(grads, factors) if grad is not None]
            if present:
                torch._foreach_mul_([grad for grad, _ in present], [factor for _, factor in present])
            self.last_stats = MaskStats(self.kept_total, self.total, self.k.numel(), top.thresholds.threshold.nanmean())
            return self.last_stats
        keep, multiplier, mean_threshold = select_coordinates(self.options, scores, self.layout, self.k, step)
        self._mask = keep
        factors = self._views(keep if multiplier is None else multiplier)
        masked = [(grad, view) for grad, view in zip(grads, factors) if grad is not None]
        if masked:
            torch._foreach_mul_([grad for grad, _ in masked], [view for _, view in masked])
        self.last_stats = MaskStats(keep.count_nonzero(), self.total, self.k.numel(), mean_threshold)
        return self.last_stats

    def update_masks(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Bool keep mask per covered parameter (shaped like it) from the last apply_."""
        if self._mask is None:
            raise RuntimeError("update_masks() needs a mask: call apply_(step) first")
        mask = self._mask if self._mask.dtype == torch.bool else self._mask.bool()
        return dict(zip(self.params, self._views(mask)))

    def update_factors(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The same keep mask as the optimizer takes it without conversion: 0 / 1 floats (views into the masker's
        buffer) on the fast path, bool otherwise."""
        if self._mask is None:
            raise RuntimeError("update_factors() needs a mask: call apply_(step) first")
        return dict(zip(self.params, self._views(self._mask)))

    def state_dict(self) -> dict[str, Any]:
        """Covered parameter names (layout order), the step count and the saliency state (the fisher_ema buffer,
        of this process's slice under split)."""
        state = {"names": list(self.names), "step": self.step, "saliency": self.scorer.state_dict()}
        if self.split is not None:
            state["slice"] = (self.lo, self.hi)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the covered parameters and their order must match."""
        if list(state["names"]) != self.names:
            raise ValueError(
                f"masker state covers {len(state['names'])} parameters that differ from this masker's "
                f"{len(self.names)} (names or order); build the masker with the same parameters, scope and exclude"
            )
        if tuple(state.get("slice", (0, self.total))) != (self.lo, self.hi):
            raise ValueError(
                f"masker state holds the saliency of coordinates {state.get('slice', (0, self.total))}, this "
                f"process masks {(self.lo, self.hi)} (another process count)"
            )
        self.step = int(state.get("step", 0))
        self.scorer.load_state_dict(state["saliency"])


_PACK_CHUNK = 1 << 20
"""Words (8 keep bytes each) packed or unpacked at a time, in two scratch buffers kept by the masker."""


def _gather_keep(keep: torch.Tensor, local: torch.Tensor, split: SplitMasking, scratch: list[torch.Tensor]) -> None:
    """All-gather every process's slice of the keep mask (`local`: 0 / 1 bytes [width]) into all of `keep` (0 / 1
    floats [world * width]): as bits (8 per byte, packed and unpacked with shifts on int64 words, in `scratch`: two
    int64 buffers) or as bytes."""
    width = local.numel()
    if not (split.packed and _LITTLE_ENDIAN):
        gathered = torch.empty(split.world * width, dtype=torch.uint8, device=keep.device)
        split.all_gather(gathered, local)
        keep.copy_(gathered)
        return
    words = local.view(torch.int64)
    packed = torch.empty(words.numel(), dtype=torch.uint8, device=keep.device)
    a, b = scratch
    for c in range(0, words.numel(), _PACK_CHUNK):
        word, x, t = (
            words[c : c + _PACK_CHUNK],
            a[: min(_PACK_CHUNK, words.numel() - c)],
            b[: min(_PACK_CHUNK, words.numel() - c)],
        )
        # The 8 bytes b0..b7 (0 / 1) of a word into one byte b0 + 2 b1 + ... + 128 b7.
        torch.bitwise_right_shift(word, 7, out=t)
        torch.bitwise_or(word, t, out=x)
        for shift in (14, 28):
            torch.bitwise_right_shift(x, shift, out=t)
            x.bitwise_or_(t)
        packed[c : c + x.numel()].copy_(x.bitwise_and_(0xFF))
    gathered = torch.empty(split.world * packed.numel(), dtype=torch.uint8, device=keep.device)
    split.all_gather(gathered, packed)
    for c in range(0, gathered.numel(), _PACK_CHUNK):
        n = min(_PACK_CHUNK, gathered.numel() - c)
        x, t = a[:n], b[:n]
        x.copy_(gathered[c : c + n])
        # Each byte back into 8 bytes of 0 / 1, byte j holding bit j.
        for shift, mask in ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101)):
            torch.bitwise_left_shift(x, shift, out=t)
            x.bitwise_or_(t).bitwise_and_(mask)
        keep[8 * c : 8 * (c + n)].copy_(x.view(torch.uint8))
