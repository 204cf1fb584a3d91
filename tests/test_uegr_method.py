"""The UEGR objective: the stacked (K+1)-chunk forward equals a slow sequential reference, one stacked forward per
step, and the selective update leaves masked coordinates untouched while excluded parameters always move."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from tests.conftest import TINY_MODELS, method_context
from uegr_dist.backward import SelectiveAdamW
from uegr_dist.config import load_config
from uegr_dist.forward import perturb_embeddings
from uegr_dist.methods.uegr import UEGR, stacked_row_keys
from uegr_dist.rng import mix_key

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(arch: str, num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=60, num_labels=num_labels, pad_token_id=0, **TINY_MODELS[arch])
    return AutoModelForSequenceClassification.from_config(cfg)


def _batch(num_labels: int = 3, batch: int = 4, seq: int = 9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    ids = ids * mask
    labels = (
        torch.randn(batch, generator=gen) if num_labels == 1 else torch.randint(0, num_labels, (batch,), generator=gen)
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_id": torch.tensor([7, 3, 11, 0])}


def _method(model, overrides, seed=0):
    cfg = load_config(None, {"method": {"rng": "keyed", **overrides}}).method
    method = UEGR(cfg)
    optimizer = SelectiveAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, mask=method.gradient_mask(seed))
    method.setup(method_context(model, optimizer, seed=seed))
    return method, optimizer


def _reference_loss(method: UEGR, model, batch, step: int, micro_step: int) -> torch.Tensor:
    """Slow reference: the clean pass and each sub-model as separate forwards, JS written out in float64."""
    cfg, n = method.cfg, method.n_chunks
    key = mix_key(method.ctx.seed, micro_step)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    mask, labels, ids = batch["attention_mask"], batch["labels"], batch["sample_id"]

    def adv_loss(e):
        with method.controller.chunks([None], row_keys=ids, key=mix_key(key, 1, 1)):
            return torch.nn.functional.cross_entropy(model(inputs_embeds=e, attention_mask=mask).logits, labels)

    adv = cfg.adversary
    delta = perturb_embeddings(
        adv_loss,
        embeds,
        mask,
        eps=adv.eps,
        step_size=adv.step_size,
        steps=adv.steps,
        norm=adv.norm,
        init_scale=adv.init_scale,
        row_keys=ids,
        key=mix_key(key, 1, 0),
        relative=adv.relative,
    )
    rates = [None, *method.schedule.rates(step)]
    all_keys = stacked_row_keys(ids, n).view(n, -1)
    logits = []
    for c in range(n):
        # The batched pass numbers dropout calls per forward, so one pass per chunk with that chunk's keys matches.
        with method.controller.chunks([rates[c]], row_keys=all_keys[c], key=mix_key(key, 2)):
            e = embeds if c == 0 else embeds + delta
            logits.append(model(inputs_embeds=e, attention_mask=mask).logits)
    ce = [torch.nn.functional.cross_entropy(lg, labels) for lg in logits]
    probs = torch.stack([lg.double().softmax(-1) for lg in logits[1:]])  # [K, B, C]

    def entropy(p):
        return -(p * p.clamp_min(1e-300).log()).sum(-1)

    js = (entropy(probs.mean(0)) - entropy(probs).mean(0)).mean()
    return ce[0] + cfg.alpha * torch.stack(ce[1:]).mean() + cfg.beta * js


@pytest.mark.parametrize(
    ("arch", "adversary"),
    [("bert", {}), ("roberta", {}), ("deberta-v2", {}), ("bert", {"relative": True, "eps": 0.2, "step_size": 0.2})],
)
def test_stacked_forward_equals_sequential_reference(arch, adversary):
    model = _tiny(arch).train()
    batch = _batch()
    overrides = {"dropout": {"k": 3, "p_min": 0.1, "p_max": 0.4}, "alpha": 0.7, "beta": 2.0, "adversary": adversary}
    method, _ = _method(model, overrides)
    fast = method.loss(model, batch, step=5, micro_step=9).loss
    slow = _reference_loss(method, model, batch, step=5, micro_step=9)
    assert math.isclose(fast.item(), slow.item(), rel_tol=1e-5, abs_tol=1e-6)
    # Same loss must give the same gradient (the stacked pass shares the embedding lookup).
    grads_fast = torch.autograd.grad(fast, list(model.parameters()), allow_unused=True)
    grads_slow = torch.autograd.grad(slow, list(model.parameters()), allow_unused=True)
    for gf, gs in zip(grads_fast, grads_slow):
        if gf is None or gs is None:
            assert gf is None and gs is None
            continue
        torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-6)


def test_one_stacked_forward_per_step_plus_adversary_passes():
    model = _tiny("bert").train()
    calls = []
    model.bert.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    method, _ = _method(model, {"dropout": {"k": 2}, "adversary": {"steps": 2}})
    method.loss(model, _batch(), step=0, micro_step=0)
    # Two ascent passes on the batch (4 rows), then ONE pass over the stacked (K + 1) * 4 rows.
    assert calls == [4, 4, 12]


def test_regression_uses_prediction_variance():
    model = _tiny("bert", num_labels=1).train()
    batch = _batch(num_labels=1)
    method, _ = _method(model, {"dropout": {"k": 2}, "adversary": {"steps": 0, "init_scale": 0.0}, "alpha": 0.0})
    out = method.loss(model, batch, step=0, micro_step=0)
    assert out.logs["consistency"] > 0.0
    clean = torch.nn.functional.mse_loss(out.logits[:, 0], batch["labels"])
    assert math.isclose(out.logs["task_loss"], clean.item(), rel_tol=1e-6)
    assert math.isclose(out.loss.item(), out.logs["task_loss"] + out.logs["consistency"], rel_tol=1e-5)


def test_selective_update_freezes_masked_and_always_moves_excluded():
    model = _tiny("bert").train()
    method, optimizer = _method(model, {"mask": {"ratio": 0.2, "exclude": ["classifier"]}})
    for step in range(3):  # later steps have non-zero Adam moments, which must not leak into masked coordinates
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        method.loss(model, _batch(), step=step, micro_step=step).loss.backward()
        optimizer.step()  # scores, selects, updates
        masks = optimizer.masker.update_masks()
        for name, param in model.named_parameters():
            moved = param.detach() != before[name]
            if name.startswith("classifier"):
                assert moved.all(), name
                continue
            assert not moved[~masks[param]].any(), f"{name}: a masked coordinate changed"
        kept = sum(int(masks[p].sum()) for n, p in model.named_parameters() if not n.startswith("classifier"))
        total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
        assert kept == math.ceil(0.2 * total)
        assert 0.19 < optimizer.last_mask_stats.keep_fraction < 0.21
