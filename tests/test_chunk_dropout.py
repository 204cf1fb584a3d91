"""Per-chunk dropout: one stacked forward equals K sequential forwards, per-chunk rates, and a clean undo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, DebertaV2Config, RobertaConfig

from uegr_dist.forward import ChunkedDropout, install_chunk_dropout

TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 3,
}
CONFIGS = {
    "bert": lambda **kw: BertConfig(**TINY, max_position_embeddings=64, **kw),
    "roberta": lambda **kw: RobertaConfig(**TINY, max_position_embeddings=66, type_vocab_size=1, **kw),
    "deberta-v2": lambda **kw: DebertaV2Config(
        **{
            **TINY,
            "max_position_embeddings": 64,
            "relative_attention": True,
            "position_buckets": 16,
            "pos_att_type": ["p2c", "c2p"],
            "type_vocab_size": 0,
            **kw,
        }
    ),
}
# DeBERTa-v2 ignores attn_implementation (its attention is always eager with dropout modules).
ARCH_IMPL = [("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa"), ("roberta", "eager"), ("deberta-v2", "eager")]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch: str, impl: str | None = None, **config_kwargs: object) -> nn.Module:
    """A seeded random tiny model; impl None keeps the architecture's default attention implementation."""
    torch.manual_seed(0)
    config = CONFIGS[arch](**config_kwargs)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=impl)


def batch(n: int = 4, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, length] (ids >= 5 avoid the special ids) and a mask with padding in two rows."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return ids, mask


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPL)
def test_stacked_pass_equals_sequential_passes_with_same_keyed_masks(arch: str, impl: str) -> None:
    model = tiny_model(arch, impl)
    ids, mask = batch()
    model.eval()
    clean = logits(model, ids, mask)
    controller = install_chunk_dropout(model)
    model.train()
    rates = [None, 0.1, 0.3]
    sample_ids = torch.arange(4) + 100
    stacked_keys = torch.cat([sample_ids * len(rates) + c for c in range(len(rates))])
    with controller.chunks(rates, stacked_keys, key=7):
        stacked = logits(model, ids.repeat(3, 1), mask.repeat(3, 1))
    sequential = []
    for c, rate in enumerate(rates):
        with controller.chunks([rate], sample_ids * len(rates) + c, key=7):
            sequential.append(logits(model, ids, mask))
    torch.testing.assert_close(stacked, torch.cat(sequential), atol=1e-5, rtol=0)
    # Dropout really acted, differently per chunk.
    for c in range(3):
        assert (stacked[4 * c : 4 * (c + 1)] - clean).abs().max() > 1e-3
    assert (stacked[4:8] - stacked[8:12]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_keyed_masks_depend_only_on_key_and_row_keys(arch: str) -> None:
    model = tiny_model(arch)
    controller = install_chunk_dropout(model)
    model.train()
    ids, mask = batch()
    keys = torch.arange(8)

    def run(key: int, row_keys: torch.Tensor, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        with controller.chunks([0.2, 0.2], row_keys, key=key):
            return logits(model, ids.repeat(2, 1), mask.repeat(2, 1))

    first = run(3, keys)
    torch.testing.assert_close(run(3, keys, global_seed=1), first, atol=0, rtol=0)  # the global RNG does not matter
    assert (run(4, keys) - first).abs().max() > 1e-3
    assert (run(3, keys + 8) - first).abs().max() > 1e-3
    # Same row keys on both chunks (same rate): both chunks see the same masks.
    same = torch.cat([torch.arange(4), torch.arange(4)])
    with controller.chunks([0.2, 0.2], same, key=3):
        twice = logits(model, ids.repeat(2, 1), mask.repeat(2, 1))
    torch.testing.assert_close(twice[:4], twice[4:], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("arch", "impl"), [("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa")])
@pytest.mark.parametrize("keyed", [False, True])
def test_rate_zero_chunk_equals_eval_output(arch: str, impl: str, keyed: bool) -> None:
    model = tiny_model(arch, impl)
    ids, mask = batch()
    model.eval()
    clean = logits(model, ids, mask)
    controller = install_chunk_dropout(model)
    model.train()
    row_keys = torch.arange(8) if keyed else None
    with controller.chunks([0.0, 0.5], row_keys):
        both = logits(model, ids.repeat(2, 1), mask.repeat(2, 1))
    torch.testing.assert_close(both[:4], clean, atol=1e-5, rtol=0)
    assert (both[4:] - clean).abs().max() > 1e-2
    with controller.chunks([0.0], None if row_keys is None else row_keys[:4]):
        alone = logits(model, ids, mask)
    torch.testing.assert_close(alone, clean, atol=1e-5, rtol=0)


def test_deberta_rate_zero_chunk_equals_eval_without_relative_attention() -> None:
    model = tiny_model("deberta-v2", relative_attention=False, pos_att_type=None)
    ids, mask = batch()
    model.eval()
    clean = logits(model, ids, mask)
    controller = install_chunk_dropout(model)
    model.train()
    with controller.chunks([0.0, 0.5], torch.arange(8)):
        both = logits(model, ids.repeat(2, 1), mask.repeat(2, 1))
    torch.testing.assert_close(both[:4], clean, atol=1e-5, rtol=0)
    assert (both[4:] - clean).abs().max() > 1e-2


def test_bert_attention_dropout_is_chunked() -> None:
    # Only attention-probability dropout is on, so any change comes from the registered attention function.
    model = tiny_model("bert", "sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    ids, mask = batch()

    def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model.eval()
    clean = hidden(ids, mask)
    controller = install_chunk_dropout(model)
    assert model.config._attn_implementation != "sdpa"
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.3
    model.train()
    with controller.chunks([0.0, None], torch.arange(8)):
        both = hidden(ids.repeat(2, 1), mask.repeat(2, 1))
    torch.testing.assert_close(both[:4], clean, atol=1e-5, rtol=0)
    assert (both[4:] - clean).abs().max() > 1e-3


def test_sdpa_with_per_chunk_rates_is_one_fused_call_per_chunk(monkeypatch) -> None:
    """With the global RNG, per-chunk attention-dropout rates keep SDPA's fused kernel: the routed attention equals
    SDPA called on each chunk's rows at its rate, in chunk order, from the same seed (the probabilities are never
    materialised: the eager path is not taken), padding masks included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import uegr_dist.forward.chunk_dropout as chunk_dropout

    model = tiny_model("bert", "sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    controller = install_chunk_dropout(model)
    routed = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    module = model.bert.encoder.layer[0].attention.self
    model.train()

    def eager_not_expected(*args, **kwargs):
        raise AssertionError("per-chunk rates without row keys took the eager attention path")

    monkeypatch.setattr(chunk_dropout, "eager_attention", eager_not_expected)
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(6, 4, 10, 8, generator=generator) for _ in range(3))
    mask = torch.ones(6, 1, 10, 10, dtype=torch.bool)
    mask[1, ..., 7:] = False
    rates = [0.0, 0.2, 0.6]
    with controller.chunks(rates):
        torch.manual_seed(0)
        got, _ = routed(module, query, key, value, mask, dropout=0.3, scaling=0.35)
    torch.manual_seed(0)
    expected = torch.cat(
        [
            sdpa_attention_forward(
                module,
                query[c * 2 : c * 2 + 2],
                key[c * 2 : c * 2 + 2],
                value[c * 2 : c * 2 + 2],
                mask[c * 2 : c * 2 + 2],
                dropout=rate,
                scaling=0.35,
            )[0]
            for c, rate in enumerate(rates)
        ]
    )
    assert torch.equal(got, expected)
    model.eval()
    clean, _ = sdpa_attention_forward(module, query[:2], key[:2], value[:2], mask[:2], dropout=0.0, scaling=0.35)
    torch.testing.assert_close(got[:2], clean)  # rate 0: no dropout
    assert (
        got[4:] - sdpa_attention_forward(module, query[4:], key[4:], value[4:], mask[4:], scaling=0.35)[0]
    ).abs().max() > 1e-2


def test_eval_mode_inside_context_has_no_dropout() -> None:
    model = tiny_model("bert")
    ids, mask = batch()
    model.eval()
    clean = logits(model, ids, mask)
    controller = install_chunk_dropout(model)
    for row_keys in (None, torch.arange(8)):
        with controller.chunks([0.5, 0.9], row_keys):
            out = logits(model, ids.repeat(2, 1), mask.repeat(2, 1))
        torch.testing.assert_close(out, clean.repeat(2, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("keyed", [False, True])
def test_drop_fraction_and_scale_per_chunk(keyed: bool) -> None:
    model = nn.Sequential(nn.Dropout(0.1))
    controller = install_chunk_dropout(model)
    rates = [0.0, 0.2, 0.5, None]
    rows = 100
    x = torch.ones(len(rates) * rows, 1000)
    row_keys = torch.arange(x.shape[0]) if keyed else None
    torch.manual_seed(0)
    with controller.chunks(rates, row_keys):
        out = model(x)
    for c, rate in enumerate([0.0, 0.2, 0.5, 0.1]):
        chunk = out[c * rows : (c + 1) * rows]
        assert abs((chunk == 0).float().mean().item() - rate) < 0.01
        kept = chunk[chunk != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (1.0 - rate)))


@pytest.mark.parametrize("keyed", [False, True])
def test_deberta_pos_dropout_keeps_base_rate_and_one_mask(keyed: bool) -> None:
    model = tiny_model("deberta-v2")
    install_chunk_dropout(model)
    site = model.deberta.encoder.layer[0].attention.self.pos_dropout
    assert isinstance(site, ChunkedDropout) and site.shared and site.p == 0.1
    assert not model.deberta.encoder.layer[0].attention.self.dropout.shared
    relative = torch.ones(2000, 40)  # no batch dimension: 2000 is not divisible by 3 chunks
    row_keys = torch.arange(6) if keyed else None
    with site.controller.chunks([0.0, 0.0, 0.0], row_keys):
        out = site(relative)
    assert abs((out == 0).float().mean().item() - 0.1) < 0.01
    if keyed:  # the mask belongs to the batch, not to its rows: other row keys, same mask
        with site.controller.chunks([0.0, 0.0, 0.0], row_keys + 100):
            torch.testing.assert_close(site(relative), out, atol=0, rtol=0)


def test_outside_context_installed_model_matches_original() -> None:
    model = tiny_model("bert", "sdpa")
    reference = copy.deepcopy(model)
    ids, mask = batch()
    controller = install_chunk_dropout(model)
    model.eval()
    reference.eval()
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), atol=0, rtol=0)
    # Train mode: the same dropout calls on the same global RNG stream.
    model.train()
    reference.train()
    torch.manual_seed(5)
    ours = logits(model, ids, mask)
    torch.manual_seed(5)
    theirs = logits(reference, ids, mask)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    controller.remove()


@pytest.mark.parametrize(("arch", "impl"), [("bert", "sdpa"), ("roberta", "eager"), ("deberta-v2", "eager")])
def test_remove_restores_modules_and_outputs(arch: str, impl: str) -> None:
    model = tiny_model(arch, impl)
    untouched = copy.deepcopy(model)
    before = dict(model.named_modules())
    ids, mask = batch()
    controller = install_chunk_dropout(model)
    assert any(isinstance(m, ChunkedDropout) for m in model.modules())
    model.train()
    with controller.chunks([None, 0.3], torch.arange(8)):
        logits(model, ids.repeat(2, 1), mask.repeat(2, 1))
    controller.remove()
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert model.config._attn_implementation == impl
    model.eval()
    untouched.eval()
    torch.testing.assert_close(logits(model, ids, mask), logits(untouched, ids, mask), atol=0, rtol=0)
    model.train()
    untouched.train()
    torch.manual_seed(9)
    ours = logits(model, ids, mask)
    torch.manual_seed(9)
    theirs = logits(untouched, ids, mask)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="removed"), controller.chunks([None]):
        pass
    controller.remove()  # idempotent


def test_bad_arguments_raise_clear_errors() -> None:
    model = tiny_model("bert")
    controller = install_chunk_dropout(model)
    model.train()
    ids, mask = batch()
    with pytest.raises(ValueError, match="not divisible by the number of chunks"), controller.chunks([0.1, 0.2, 0.3]):
        logits(model, ids, mask)
    with pytest.raises(ValueError, match="row_keys has 3 entries"), controller.chunks([0.1], torch.arange(3)):
        logits(model, ids, mask)
    for bad in ([], [1.0], [-0.1], ["0.1"], 0.1):
        with pytest.raises(ValueError, match="rates"), controller.chunks(bad):
            pass
    with pytest.raises(ValueError, match="row_keys"), controller.chunks([0.1], torch.zeros(4)):
        pass
    with pytest.raises(RuntimeError, match="nested"), controller.chunks([0.1]), controller.chunks([0.2]):
        pass
    with pytest.raises(ValueError, match="already"):
        install_chunk_dropout(model)
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="gradient checkpointing"), controller.chunks([0.1]):
        pass
    model.gradient_checkpointing_disable()
    controller.remove()
    flex = tiny_model("bert", "sdpa")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="allowed"):
        install_chunk_dropout(flex)
    assert not any(isinstance(m, ChunkedDropout) for m in flex.modules())
