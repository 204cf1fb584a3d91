"""GradientMasker and saliency scores against per-tensor references built with torch.sort."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import run_in_threads
from uegr_dist.backward.masking import _SOFT_MASK_STREAM, GradientMasker, MaskOptions, keep_count, segment_names
from uegr_dist.backward.radix_select import relative_rank
from uegr_dist.backward.saliency import SaliencyScorer
from uegr_dist.config import MaskConfig
from uegr_dist.rng import keyed_uniform_flat, mix_key

SHAPES = {
    "embeddings.word.weight": (30, 8),
    "encoder.layer.0.attn.weight": (8, 8),
    "encoder.layer.1.attn.weight": (8, 8),
    "pooler.dense.weight": (8, 8),
    "classifier.weight": (2, 8),
    # The optimizer's no-decay group comes last, so a layer's tensors are not contiguous in canonical order.
    "encoder.layer.0.attn.bias": (8,),
    "encoder.layer.1.attn.bias": (8,),
    "encoder.layer.1.norm.weight": (8,),
    "classifier.bias": (2,),
}


def toy_params(seed: int = 0, integer: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters with gradients; integer values make many exact ties in |theta * g| (zeros included)."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for name, shape in SHAPES.items():
        if integer:
            param = torch.nn.Parameter(torch.randint(-3, 4, shape, generator=gen).float())
            param.grad = torch.randint(-2, 3, shape, generator=gen).float()
        else:
            param = torch.nn.Parameter(torch.randn(shape, generator=gen))
            param.grad = torch.randn(shape, generator=gen)
        named.append((name, param))
    return named


def reference_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """First k of a stable descending sort (ties: lowest position)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return keep


def reference_segments(names: list[str], scope: str) -> dict[str, list[int]]:
    """Segment -> indices (canonical order) of its parameters."""
    groups: dict[str, list[int]] = {}
    for i, segment in enumerate(segment_names(names, scope)):
        groups.setdefault(segment, []).append(i)
    return groups


def test_segment_names_rule() -> None:
    names = [
        "roberta.embeddings.word_embeddings.weight",
        "roberta.encoder.layer.0.attention.self.query.weight",
        "roberta.encoder.layer.11.output.dense.bias",
        "roberta.pooler.dense.weight",
        "classifier.out_proj.weight",
        "deberta.encoder.rel_embeddings.weight",
        "deberta.encoder.layer.3.output.LayerNorm.weight",
        "model.layers.2.mlp.weight",
        "logit_scale",
    ]
    assert segment_names(names, "per_layer") == [
        "roberta.embeddings",
        "roberta.encoder.layer.0",
        "roberta.encoder.layer.11",
        "roberta.pooler",
        "classifier",
        "deberta.encoder.rel_embeddings",
        "deberta.encoder.layer.3",
        "model.layers.2",
        "logit_scale",
    ]
    assert segment_names(names, "global") == ["global"] * len(names)
    assert segment_names(names, "per_tensor") == names


@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_layer"])
def test_hard_mask_matches_sort_per_segment(scope: str) -> None:
    named = toy_params()
    names = [name for name, _ in named]
    before = {name: param.grad.clone() for name, param in named}
    masker = GradientMasker(named, MaskOptions(ratio=0.3, scope=scope))
    stats = masker.apply_(step=0)
    masks = masker.update_masks()
    expected_kept = 0
    for indices in reference_segments(names, scope).values():
        # Scores of the segment in canonical order: ties go to the lowest canonical position.
        scores = torch.cat([(named[i][1].detach() * before[names[i]]).abs().flatten() for i in indices])
        k = keep_count(0.3, scores.numel())
        expected = reference_keep(scores, k)
        got = torch.cat([masks[named[i][1]].flatten() for i in indices])
        assert torch.equal(got, expected)
        expected_kept += k
        for i, piece in zip(indices, expected.split([named[i][1].numel() for i in indices])):
            grad, piece = named[i][1].grad, piece.view(named[i][1].shape)
            assert torch.equal(grad[piece], before[names[i]][piece])  # kept: unchanged
            assert not grad[~piece].any()  # dropped: zero
    assert stats.kept == expected_kept and stats.total == sum(p.numel() for _, p in named)
    assert stats.num_segments == len(reference_segments(names, scope))


def test_keep_count_is_exact() -> None:
    assert keep_count(0.3, 10) == 3
    assert keep_count(0.3, 11) == 4
    assert keep_count(1e-9, 5) == 1
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.5, 0) == 0


def test_ratio_one_keeps_every_gradient() -> None:
    named = toy_params(integer=False)
    before = [param.grad.clone() for _, param in named]
    stats = GradientMasker(named, MaskOptions(ratio=1.0)).apply_(step=0)
    assert stats.kept == stats.total
    assert all(torch.equal(param.grad, grad) for (_, param), grad in zip(named, before))


def test_excluded_frozen_and_gradless_parameters() -> None:
    named = toy_params(integer=False)
    params = dict(named)
    params["pooler.dense.weight"].requires_grad_(False)
    params["encoder.layer.0.attn.bias"].grad = None
    before = {name: None if p.grad is None else p.grad.clone() for name, p in named}
    masker = GradientMasker(named, MaskOptions(ratio=0.2, exclude=[r"^classifier\.", "pooler"]))
    masker.apply_(step=3)
    masks = masker.update_masks()
    for name in ("classifier.weight", "classifier.bias", "pooler.dense.weight"):
        assert torch.equal(params[name].grad, before[name])
        assert params[name] not in masks
    assert params["encoder.layer.0.attn.bias"].grad is None
    assert not masks[params["encoder.layer.0.attn.bias"]].any()  # no gradient scores 0: never above the cut
    assert masker.names == [n for n in params if not n.startswith(("classifier", "pooler"))]


def test_saliency_kinds_equal_per_tensor_reference() -> None:
    named = toy_params(integer=False)
    params = [param for _, param in named]
    grads: list[torch.Tensor | None] = [param.grad for param in params]
    grads[2] = None
    flat = torch.empty(sum(p.numel() for p in params))
    views = list(flat.split([p.numel() for p in params]))
    views = [view.view(p.shape) for view, p in zip(views, params)]

    def reference(kind: str, grad_list: list[torch.Tensor | None]) -> torch.Tensor:
        pieces = []
        for param, grad in zip(params, grad_list):
            g = torch.zeros_like(param) if grad is None else grad
            pieces.append(((param.detach() * g).abs() if kind == "taylor" else g * g).flatten())
        return torch.cat(pieces)

    for kind in ("taylor", "grad_sq"):
        scores = SaliencyScorer(kind).score_(flat, views, params, grads)
        torch.testing.assert_close(scores, reference(kind, grads), rtol=0, atol=0)
        assert not scores.requires_grad

    scorer = SaliencyScorer("fisher_ema", ema_beta=0.8)
    first = scorer.score_(flat, views, params, grads).clone()
    torch.testing.assert_close(first, 0.2 * reference("grad_sq", grads))
    second_grads: list[torch.Tensor | None] = [None if g is None else 2.0 * g + 1.0 for g in grads]
    second = scorer.score_(flat, views, params, second_grads)
    torch.testing.assert_close(second, 0.8 * first + 0.2 * reference("grad_sq", second_grads))


def test_fisher_ema_state_round_trip() -> None:
    named = toy_params(integer=False)
    masker = GradientMasker(named, MaskOptions(ratio=0.3, saliency="fisher_ema", ema_beta=0.5, scope="per_layer"))
    masker.apply_(step=0)
    state = masker.state_dict()
    assert state["saliency"]["ema"] is not None and state["saliency"]["ema"].abs().sum() > 0

    gen = torch.Generator().manual_seed(9)
    new_grads = [torch.randn(p.shape, generator=gen) for _, p in named]
    twin = toy_params(integer=False)
    restored = GradientMasker(twin, MaskOptions(ratio=0.3, saliency="fisher_ema", ema_beta=0.5, scope="per_layer"))
    restored.load_state_dict(state)
    for (_, a), (_, b), grad in zip(named, twin, new_grads):
        a.grad, b.grad = grad.clone(), grad.clone()
    masker.apply_(step=1)
    restored.apply_(step=1)
    assert torch.equal(masker.scorer.ema, restored.scorer.ema)
    assert not torch.equal(masker.scorer.ema, state["saliency"]["ema"])  # the state evolved
    assert all(torch.equal(masker.update_masks()[a], restored.update_masks()[b]) for (_, a), (_, b) in zip(named, twin))

    other = GradientMasker(toy_params(), MaskOptions(saliency="fisher_ema", exclude=["classifier"]))
    with pytest.raises(ValueError, match="differ"):
        other.load_state_dict(state)


def big_params(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    """A few thousand coordinates for statistics on the soft mask."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for i, shape in enumerate([(64, 64), (64,), (128, 32), (16, 16)]):
        param = torch.nn.Parameter(torch.randn(shape, generator=gen))
        param.grad = torch.randn(shape, generator=gen)
        named.append((f"encoder.layer.{i}.weight", param))
    return named


def test_soft_mask_reproducible_and_on_target() -> None:
    ratio, temperature = 0.3, 10.0
    named = big_params(0)
    grads = [param.grad.clone() for _, param in named]
    masker = GradientMasker(named, MaskOptions(ratio=ratio, kind="soft", soft_temperature=temperature, seed=5))
    stats = masker.apply_(step=4)
    mask = torch.cat([m.flatten() for m in masker.update_masks().values()])

    for (_, param), grad in zip(named, grads):
        param.grad = grad.clone()
    again = GradientMasker(named, MaskOptions(ratio=ratio, kind="soft", soft_temperature=temperature, seed=5))
    again.apply_(step=4)
    assert torch.equal(torch.cat([m.flatten() for m in again.update_masks().values()]), mask)
    for (_, param), grad in zip(named, grads):
        param.grad = grad.clone()
    again.apply_(step=5)
    later = torch.cat([m.flatten() for m in again.update_masks().values()])
    assert not torch.equal(later, mask)
    for (_, param), grad, piece in zip(named, grads, later.split([p.numel() for _, p in named])):
        assert torch.equal(param.grad.flatten(), grad.flatten() * piece)

    scores = torch.cat([(p.detach() * g).abs().flatten() for (_, p), g in zip(named, grads)])
    rank = relative_rank(scores, torch.tensor([0, scores.numel()]))
    prob = torch.sigmoid(2 * temperature * (rank - (1 - ratio))).double()
    spread = math.sqrt(float((prob * (1 - prob)).sum()))
    assert abs(stats.kept - float(prob.sum())) < 4 * spread
    assert abs(float(prob.mean()) - ratio) < 0.01  # the schedule keeps about rho in expectation
    top, bottom = rank > 0.9, rank < 0.5
    assert mask[top].float().mean() > 0.95 and mask[bottom].float().mean() < 0.01


def test_invalid_arguments_raise() -> None:
    """A bad option fails when MaskOptions is built, naming the option (the `method.mask` key) and the value."""
    named = toy_params()
    for kwargs, message in [
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),
        ({"ratio": 1.5}, "ratio"),
        ({"scope": "per_head"}, "scope must be one of .*'per_head'"),
        ({"kind": "sparse"}, "kind"),
        ({"saliency": "hessian"}, "saliency"),
        ({"ema_beta": 1.0}, "ema_beta"),
        ({"soft_temperature": 0.0}, "soft_temperature"),
        ({"exclude": ["("]}, "regex"),
    ]:
        with pytest.raises(ValueError, match=message):
            MaskOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameter"):
        GradientMasker(named, MaskOptions(exclude=["."]))
    with pytest.raises(RuntimeError, match="apply_"):
        GradientMasker(named, MaskOptions()).update_masks()


def test_mask_options_from_config_carry_every_mask_key() -> None:
    """Every `method.mask` key but `enabled` reaches the masker; the options do not follow later config edits."""
    cfg = MaskConfig(
        ratio=0.2, scope="per_layer", kind="soft", saliency="fisher_ema", ema_beta=0.5, soft_temperature=3.0
    )
    cfg.exclude.append("classifier")
    options = MaskOptions.from_config(cfg, seed=7)
    assert options == MaskOptions(
        ratio=0.2,
        scope="per_layer",
        kind="soft",
        saliency="fisher_ema",
        ema_beta=0.5,
        soft_temperature=3.0,
        exclude=("classifier",),
        seed=7,
    )
    cfg.exclude.append("pooler")
    assert options.exclude == ("classifier",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ratio = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="ratio"):
        MaskOptions.from_config(MaskConfig(ratio=0.0), seed=0)  # a config built in code skips the loader's checks


def test_soft_mask_is_keyed_by_canonical_position() -> None:
    """Per segment: Bernoulli(sigmoid(2 T (rank - (1 - rho)))) with uniforms keyed by canonical flat position."""
    named = toy_params(integer=False)
    names = [name for name, _ in named]
    grads = {name: param.grad.clone() for name, param in named}
    masker = GradientMasker(named, MaskOptions(ratio=0.4, scope="per_layer", kind="soft", soft_temperature=3.0, seed=2))
    masker.apply_(step=7)
    masks = masker.update_masks()
    starts = [0, *torch.tensor([p.numel() for _, p in named]).cumsum(0).tolist()]
    key = mix_key(2, _SOFT_MASK_STREAM, 7)
    for indices in reference_segments(names, "per_layer").values():
        scores = torch.cat([(named[i][1].detach() * grads[names[i]]).abs().flatten() for i in indices])
        rank = relative_rank(scores, torch.tensor([0, scores.numel()]))
        prob = torch.sigmoid((rank - (1 - 0.4)) * (2 * 3.0))
        uniform = torch.cat([keyed_uniform_flat(key, starts[i], named[i][1].numel()) for i in indices])
        got = torch.cat([masks[named[i][1]].flatten() for i in indices])
        assert torch.equal(got, uniform < prob)


class ThreadGroup:
    """`world` maskers in threads, with an all-reduce (sum) and an all-gather at barriers."""

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def _exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        values = [slot for slot in self.slots if slot is not None]
        self.barrier.wait()
        return values

    def split(self, rank: int, packed: bool):
        from uegr_dist.backward.masking import SplitMasking

        def all_reduce_sum(tensor: torch.Tensor) -> None:
            tensor.copy_(torch.stack(self._exchange(rank, tensor)).sum(0))

        def all_gather(output: torch.Tensor, local: torch.Tensor) -> None:
            output.copy_(torch.cat(self._exchange(rank, local)))

        return SplitMasking(rank, self.world, all_reduce_sum, all_gather, packed)

    def run(self, fn):
        return run_in_threads(self.world, self.barrier, fn)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    ("scope", "saliency"), [("global", "taylor"), ("per_layer", "grad_sq"), ("per_tensor", "fisher_ema")]
)
def test_split_masking_equals_one_process(scope: str, saliency: str, world: int, packed: bool, monkeypatch) -> None:
    """DDP's split masker (each process scores and selects 1 / N of the coordinates, kept sets all-gathered) leaves
    every process with exactly the one-process masker's masked gradients and update masks, step after step (the
    fisher_ema state lives per slice); heavy ties cut across the slices; bits packed a few words at a time."""
    import uegr_dist.backward.masking as module

    monkeypatch.setattr(module, "_PACK_CHUNK", 3)
    options = MaskOptions(ratio=0.3, scope=scope, saliency=saliency)
    single_named = toy_params()
    single = GradientMasker(single_named, options)
    group = ThreadGroup(world)
    ranks = [toy_params() for _ in range(world)]
    maskers = [GradientMasker(ranks[r], options, split=group.split(r, packed)) for r in range(world)]
    assert maskers[0].split is not None and maskers[0].hi - maskers[0].lo < single.total
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randint(-2, 3, param.shape, generator=gen).float() for _, param in single_named]
        for named in [single_named, *ranks]:
            for (_, param), grad in zip(named, grads):
                param.grad = grad.clone()
        stats = single.apply_()
        group.run(lambda rank: maskers[rank].apply_())
        expected = single.update_masks()
        for r in range(world):
            got = maskers[r].update_masks()
            for (_, a), (_, b) in zip(single_named, ranks[r]):
                assert torch.equal(expected[a], got[b]), (step, r)
                assert torch.equal(a.grad, b.grad)
        assert stats.kept == maskers[0].kept_total
