"""Per-chunk dropout: one batched forward runs several dropout sub-models, each on its own contiguous chunk of rows.

`install_chunk_dropout(model)` swaps every `nn.Dropout` for a `ChunkedDropout` and routes BERT/RoBERTa attention
through a registered attention function, so that inside `controller.chunks([r_0, ..., r_{n-1}])` the rows of chunk c
(dim 0 split into n equal contiguous parts) see dropout rate r_c at every dropout site, attention probabilities
included. Outside a `chunks` context the model behaves exactly as before, and `remove()` undoes everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uegr_dist.forward.attention import (
    AttentionRoute,
    check_attention,
    eager_attention,
    original_attention,
    route_attention,
)
from uegr_dist.rng import keyed_uniform, mix_key

# DeBERTa-v2 applies `pos_dropout` to relative position embeddings shared by every row (dim 0 is a relative
# position, not a sample): it cannot be split into chunks, so it keeps its base rate and one mask for the batch.
SHARED_SITE_NAMES = frozenset({"pos_dropout"})
_CHUNKED_PREFIX = "uegr_chunked_"


@dataclass
class _ChunkContext:
    rates: tuple[float | None, ...]
    row_keys: torch.Tensor | None
    key: int
    call_index: int = 0


class ChunkedDropout(nn.Dropout):
    """Dropout whose rate is chosen per chunk of rows by its controller's active `chunks` context ([B, ...] -> same).

    Subclasses `nn.Dropout` and keeps `.p` (the original rate) because transformers reads `self.dropout.p` to pass the
    attention dropout rate, and code that walks `isinstance(m, nn.Dropout)` keeps working.
    """

    def __init__(self, p: float, inplace: bool, controller: ChunkDropoutController, shared: bool) -> None:
        super().__init__(p=p, inplace=inplace)
        self.controller = controller
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ...] -> x with dropout at the rate of each row's chunk (or plain dropout outside a context)."""
        context = self.controller._context
        if context is None:
            return F.dropout(x, self.p, self.training, self.inplace)
        if self.shared:
            return _shared_dropout(context, x, self.p, self.training)
        rates, call_index = _begin_call(context, x.shape[0], self.p)
        if not self.training:
            return x
        return _drop_rows(context, x, rates, call_index)


class ChunkDropoutController:
    """Handle returned by `install_chunk_dropout`: opens per-chunk dropout contexts and undoes the install."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._context: _ChunkContext | None = None
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._route: AttentionRoute | None = None
        self._removed = False

    @contextlib.contextmanager
    def chunks(
        self, rates: Sequence[float | None], row_keys: torch.Tensor | None = None, key: int = 0
    ) -> Iterator[None]:
        """Within the block, chunk c of every dropout input's rows uses rates[c] (None = the site's own rate).

        row_keys: int64 [B_total] per-row keys for reproducible masks (None: global torch RNG). Masks then depend only
        on (key, row key, index of the dropout call since entering the block).
        """
        if self._removed:
            raise RuntimeError("chunks(): this controller was removed; install_chunk_dropout(model) again")
        if self._context is not None:
            raise RuntimeError("chunks(): contexts cannot be nested")
        if any(getattr(module, "gradient_checkpointing", False) for module in self._model.modules()):
            # The backward recompute would rerun dropout outside this block (wrong rates, different call indices).
            raise RuntimeError(
                "chunks(): gradient checkpointing is enabled; call model.gradient_checkpointing_disable()"
            )
        self._context = _ChunkContext(_checked_rates(rates), _checked_row_keys(row_keys), int(key))
        try:
            yield
        finally:
            self._context = None

    def remove(self) -> None:
        """Put the original dropout modules (the same objects) and attention implementations back; idempotent."""
        if self._context is not None:
            raise RuntimeError("remove(): called inside an active chunks() context")
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        if self._route is not None:
            self._route.remove()
        self._swapped.clear()
        self._removed = True


def install_chunk_dropout(model: nn.Module) -> ChunkDropoutController:
    """Make every dropout site of `model` chunk-aware (modules and attention probabilities); returns the controller."""
    if any(isinstance(module, ChunkedDropout) for module in model.modules()):
        raise ValueError("install_chunk_dropout(): the model already has chunked dropout installed")
    check_attention(model, "install_chunk_dropout()")
    controller = ChunkDropoutController(model)
    replacements: dict[int, ChunkedDropout] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Dropout):
                continue
            replacement = replacements.get(id(child))
            if replacement is None:
                replacement = ChunkedDropout(child.p, child.inplace, controller, shared=name in SHARED_SITE_NAMES)
                replacement.train(child.training)
                replacements[id(child)] = replacement
            setattr(parent, name, replacement)
            controller._swapped.append((parent, name, child))
    controller._route = route_attention(model, _CHUNKED_PREFIX, _make_chunked_attention)
    return controller


def _begin_call(context: _ChunkContext, batch: int, base_rate: float) -> tuple[tuple[float, ...], int]:
    """Count one dropout call of the context; return its per-chunk rates (None -> base_rate) and its call index."""
    n_chunks = len(context.rates)
    if batch % n_chunks != 0:
        raise ValueError(
            f"chunks(): the batch dimension ({batch} rows) is not divisible by the number of chunks "
            f"(len(rates) = {n_chunks})"
        )
    if context.row_keys is not None and context.row_keys.shape[0] != batch:
        raise ValueError(
            f"chunks(): row_keys has {context.row_keys.shape[0]} entries but the dropout input has {batch} rows"
        )
    call_index = context.call_index
    context.call_index += 1
    return tuple(base_rate if rate is None else rate for rate in context.rates), call_index


def _drop_rows(context: _ChunkContext, x: torch.Tensor, rates: tuple[float, ...], call_index: int) -> torch.Tensor:
    """Inverted dropout on x [B, ...] with rate rates[c] on the rows of chunk c (B = n_chunks * rows per chunk)."""
    if max(rates) == 0.0:
        return x
    if context.row_keys is None and min(rates) == max(rates):
        # One rate for every row: the fused kernel is faster and draws from the same global RNG.
        return F.dropout(x, rates[0], True)
    batch = x.shape[0]
    if context.row_keys is None:
        uniform = torch.rand(x.shape, device=x.device)
    else:
        if context.row_keys.device != x.device:
            # Move once per context, not once per dropout site.
            context.row_keys = context.row_keys.to(x.device)
        uniform = keyed_uniform(mix_key(context.key, call_index), context.row_keys, tuple(x.shape[1:]))
    broadcast = (batch,) + (1,) * (x.dim() - 1)
    rows_per_chunk = batch // len(rates)
    # Filled on the device (torch.tensor(rates, device=...) would copy from the host and wait for the copy).
    rate = torch.cat([torch.full((rows_per_chunk,), r, device=x.device) for r in rates]).view(broadcast)
    scale = torch.cat([torch.full((rows_per_chunk,), 1.0 / (1.0 - r), device=x.device, dtype=x.dtype) for r in rates])
    scale = scale.view(broadcast)
    return torch.where(uniform >= rate, x * scale, 0.0)


def _shared_dropout(context: _ChunkContext, x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Dropout at the site's base rate with one mask for all chunks (x has no batch dim, e.g. [2 * span, D])."""
    call_index = context.call_index
    context.call_index += 1
    if not training or rate == 0.0:
        return x
    if context.row_keys is None:
        return F.dropout(x, rate, True)
    # A fixed row key: every pass that reaches this call index shares the mask, as the rows of one batch do.
    row_key = torch.zeros(1, dtype=torch.int64, device=x.device)
    uniform = keyed_uniform(mix_key(context.key, call_index), row_key, tuple(x.shape))[0]
    return torch.where(uniform >= rate, x * (1.0 / (1.0 - rate)), 0.0)


def _checked_rates(rates: Sequence[float | None]) -> tuple[float | None, ...]:
    """Validate chunk rates (None or 0 <= r < 1) and turn them into Python floats."""
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or len(rates) == 0:
        raise ValueError(f"chunks(): rates must be a non-empty sequence of floats in [0, 1) or None, got {rates!r}")
    checked: list[float | None] = []
    for rate in rates:
        if rate is None:
            checked.append(None)
            continue
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"chunks(): each of rates must be a float in [0, 1) or None, got {rate!r} in {rates!r}")
        checked.append(float(rate))
    return tuple(checked)


def _checked_row_keys(row_keys: torch.Tensor | None) -> torch.Tensor | None:
    """Validate row keys: None or a 1-D integer tensor."""
    if row_keys is None:
        return None
    if not isinstance(row_keys, torch.Tensor) or row_keys.dim() != 1 or row_keys.is_floating_point():
        raise ValueError(f"chunks(): row_keys must be None or a 1-D int64 tensor [B_total], got {row_keys!r}")
    return row_keys


def _attention_per_chunk(
    original: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    module: nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    rates: tuple[float, ...],
    scaling: float | None,
    kwargs: dict[str, object],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """original(...) on each chunk's rows of q, k, v [B, H, S, d] (and of the mask and of any tensor keyword argument
    with B rows) at rate rates[c]; outputs [B, S, H, d] (and attention weights, if returned) concatenated."""
    query, key, value, attention_mask = inputs
    batch = query.shape[0]
    rows = batch // len(rates)

    def part(x: object, c: int) -> object:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x[c * rows : (c + 1) * rows]
        return x

    outputs, weights = [], []
    for c, rate in enumerate(rates):
        chunk_kwargs = {name: part(value_, c) for name, value_ in kwargs.items()}
        out, weight = original(
            module,
            query[c * rows : (c + 1) * rows],
            key[c * rows : (c + 1) * rows],
            value[c * rows : (c + 1) * rows],
            part(attention_mask, c),
            dropout=rate,
            scaling=scaling,
            **chunk_kwargs,
        )
        outputs.append(out)
        weights.append(weight)
    if any(weight is None for weight in weights):
        return torch.cat(outputs), None
    return torch.cat(outputs), torch.cat(weights)


def _make_chunked_attention(implementation: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Attention function applying per-chunk dropout to the probabilities, delegating to the original otherwise."""

    def chunked_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v [B, H, S, d], mask (bool / additive [B, 1, S, S] or None) -> output [B, S, H, d], probs."""
        original = original_attention(module, implementation)
        site = getattr(module, "dropout", None)
        context = site.controller._context if isinstance(site, ChunkedDropout) else None
        if context is None:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        # transformers passes dropout = 0.0 in eval mode and the site's `.p` in train mode: that is the base rate.
        rates, call_index = _begin_call(context, query.shape[0], dropout)
        if not module.training or max(rates) == 0.0:
            return original(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
        if context.row_keys is None and min(rates) == max(rates):
            return original(module, query, key, value, attention_mask, dropout=rates[0], scaling=scaling, **kwargs)
        if context.row_keys is None and implementation == "sdpa":
            # Per-row rates would need the probabilities materialised (eager); one fused call per chunk at that
            # chunk's rate keeps the fused kernel. Global RNG: the chunks draw in order.
            return _attention_per_chunk(original, module, (query, key, value, attention_mask), rates, scaling, kwargs)
        return eager_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            drop=lambda probs: _drop_rows(context, probs, rates, call_index),
        )

    chunked_attention.__name__ = f"chunked_{implementation}_attention"
    return chunked_attention
