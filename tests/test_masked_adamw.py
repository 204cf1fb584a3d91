"""MaskedAdamW equals torch.optim.AdamW without masks and freezes masked coordinates (value and moments) with them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from uegr_dist.backward.masked_adamw import MaskedAdamW

HYPER = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6}


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5, 4), (4,), (3, 3, 2)]]


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """A decayed and an undecayed group, like the engine's decay / no-decay split."""
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)


@pytest.mark.parametrize("all_true_masks", [False, True])
def test_without_masks_equals_torch_adamw(all_true_masks: bool) -> None:
    ours_params, ref_params = make_params(), make_params()
    ours, ref = MaskedAdamW(groups(ours_params), **HYPER), torch.optim.AdamW(groups(ref_params), **HYPER)
    for step in range(6):
        set_grads(ours_params, step)
        set_grads(ref_params, step)
        if all_true_masks:
            ours.set_update_masks({p: torch.ones_like(p, dtype=torch.bool) for p in ours_params})
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], ref.state[b][key], rtol=1e-6, atol=1e-7)
        assert float(ours.state[a]["step"]) == float(ref.state[b]["step"]) == 6


def test_masked_coordinates_keep_value_and_moments() -> None:
    params = make_params()
    opt = MaskedAdamW(groups(params), **HYPER)
    for step in range(3):  # non-zero moments before the masked step
        set_grads(params, step)
        opt.step()
    set_grads(params, 3)
    gen = torch.Generator().manual_seed(1)
    masks = {p: torch.rand(p.shape, generator=gen) < 0.4 for p in params[:2] + params[2:3]}
    unmasked = params[1]
    del masks[unmasked]  # one parameter without a mask: plain AdamW

    # Reference for the kept coordinates: torch AdamW from the same state (MaskedAdamW shares its state layout).
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(groups(ref_params), **HYPER)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, ref_params):
        q.grad = p.grad.clone()
    ref.step()

    before = {
        p: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params
    }
    opt.set_update_masks(masks)
    opt.step()
    for p, q in zip(params, ref_params):
        keep = masks.get(p, torch.ones_like(p, dtype=torch.bool))
        after = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        for now, old in zip(after, before[p]):
            assert torch.equal(now[~keep], old[~keep])  # bit for bit
        torch.testing.assert_close(p.detach()[keep], q.detach()[keep], rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key][keep], ref.state[q][key][keep], rtol=1e-6, atol=1e-7)
        assert (p.detach()[keep] != before[p][0][keep]).all()  # kept coordinates did move

    # Masks are consumed by one step: the next one updates every coordinate again.
    set_grads(params, 4)
    frozen = params[0].detach().clone()
    opt.step()
    assert (params[0].detach() != frozen).all()


def test_invalid_masks_and_hyperparameters_raise() -> None:
    params = make_params()
    opt = MaskedAdamW(params)
    with pytest.raises(ValueError, match="bool"):
        opt.set_update_masks({params[0]: torch.ones(params[0].shape, dtype=torch.float64)})
    with pytest.raises(ValueError, match="shaped"):
        opt.set_update_masks({params[0]: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.set_update_masks({torch.nn.Parameter(torch.zeros(2)): torch.ones(2, dtype=torch.bool)})
    for kwargs, name in [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": -0.1}, "weight")]:
        with pytest.raises(ValueError, match=name):
            MaskedAdamW(params, **kwargs)  # type: ignore[arg-type]


def test_update_is_the_same_in_any_grouping(monkeypatch) -> None:
    """The update runs over groups of about UPDATE_CHUNK_ELEMENTS elements (bounded temporaries): groups cut between
    every parameter give the same bits as one group of all, with and without masks."""
    import uegr_dist.backward.masked_adamw as module

    results = []
    for chunk in (1 << 30, 1):
        monkeypatch.setattr(module, "UPDATE_CHUNK_ELEMENTS", chunk)
        params = make_params()
        opt = MaskedAdamW(groups(params), **HYPER)
        gen = torch.Generator().manual_seed(3)
        for step in range(4):
            set_grads(params, step)
            if step % 2:  # masked and unmasked steps both run in groups
                opt.set_update_masks({p: torch.rand(p.shape, generator=gen) < 0.5 for p in params})
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params])
    for one, many in zip(*results):
        for a, b in zip(one, many):
            assert torch.equal(a, b)


def previous_masked_update(
    params: list[torch.nn.Parameter], states: list[dict], masks: list[torch.Tensor], group: dict
):
    """The masked update as it was written before the fused form (increments scaled by the mask), the reference
    the fused form must equal bit for bit."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"].item() for s in states]
    root_corrections = [math.sqrt(1.0 - beta2**t) for t in steps]
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    masks = [mask.to(p.dtype) for p, mask in zip(params, masks)]
    with torch.no_grad():
        if weight_decay != 0.0:
            torch._foreach_addcmul_(params, params, masks, value=-lr * weight_decay)
        a = torch._foreach_mul(grads, grads)
        torch._foreach_sub_(a, exp_avg_sqs)
        torch._foreach_mul_(a, masks)
        torch._foreach_add_(exp_avg_sqs, a, alpha=1.0 - beta2)
        b = torch._foreach_sub(grads, exp_avgs)
        torch._foreach_mul_(b, masks)
        torch._foreach_add_(exp_avgs, b, alpha=1.0 - beta1)
        torch._foreach_copy_(a, exp_avg_sqs)
        torch._foreach_sqrt_(a)
        torch._foreach_div_(a, root_corrections)
        torch._foreach_add_(a, eps)
        torch._foreach_copy_(b, exp_avgs)
        torch._foreach_mul_(b, masks)
        torch._foreach_addcdiv_(params, b, a, step_sizes)


def odd_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Sizes that leave vector tails (not multiples of 8 or 16) and one tensor larger than the update's slices."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7, 13), (1001,), (3, 5, 11), (37,)]]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("chunk", [1 << 30, 64])
def test_masked_update_equals_the_previous_form_bit_for_bit(mask_dtype, chunk, monkeypatch) -> None:
    """The fused masked update (lerp with the mask as weights, scratch buffers, parameters in slices) computes the
    same bits as the increment form it replaced, for bool masks and for the masker's float 0 / 1 masks."""
    import uegr_dist.backward.masked_adamw as module

    monkeypatch.setattr(module, "UPDATE_CHUNK_ELEMENTS", chunk)
    ours_params, ref_params = odd_params(), odd_params()
    ours = MaskedAdamW(groups(ours_params), **HYPER)
    ref = MaskedAdamW(groups(ref_params), **HYPER)  # its state layout; the masked steps below use the old form
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        set_grads(ours_params, step)
        set_grads(ref_params, step)
        if step == 0:  # moments start from a plain step
            ours.step()
            ref.step()
            continue
        masks = [torch.rand(p.shape, generator=gen) < 0.4 for p in ours_params]
        ours.set_update_masks({p: m.to(mask_dtype) for p, m in zip(ours_params, masks)})
        ours.step()
        for group in ref.param_groups:
            members = [next(i for i, q in enumerate(ref_params) if q is p) for p in group["params"]]
            states = [ref.state[ref_params[i]] for i in members]
            for state in states:
                state["step"] += 1
            previous_masked_update([ref_params[i] for i in members], states, [masks[i] for i in members], group)
    for a, b in zip(ours_params, ref_params):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[a][key], ref.state[b][key])


@pytest.mark.parametrize("masked", [False, True])
def test_step_gate(masked: bool, monkeypatch) -> None:
    """A True gate changes no bit of the update; a False one leaves parameters and moments as they were, even with
    NaN and inf gradients; `undo_step_counts` then takes the step count back, and the run goes on exactly as one
    that never took that step."""
    import uegr_dist.backward.masked_adamw as module

    monkeypatch.setattr(module, "UPDATE_CHUNK_ELEMENTS", 64)
    runs = {name: odd_params() for name in ("gated", "plain")}
    opts = {name: MaskedAdamW(groups(params), **HYPER) for name, params in runs.items()}
    gen = torch.Generator().manual_seed(9)
    for step in range(6):
        masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in runs["plain"]]
        bad = step == 3
        for name, params in runs.items():
            if name == "plain" and bad:
                continue  # the reference skips the bad step altogether
            set_grads(params, step)
            if bad:
                params[0].grad[0, 0] = math.nan
                params[1].grad[3] = math.inf
            before = [(p.detach().clone(), dict(opts[name].state[p])) for p in params]
            before = [(v, {k: t.clone() for k, t in s.items()}) for v, s in before]
            if masked:
                opts[name].set_update_masks(dict(zip(params, masks)))
            if name == "gated":
                opts[name].set_step_gate(torch.tensor(not bad))
            opts[name].step()
            if bad:
                for p, (value, state) in zip(params, before):
                    assert torch.equal(p, value)
                    assert torch.equal(opts[name].state[p]["exp_avg"], state["exp_avg"])
                    assert torch.equal(opts[name].state[p]["exp_avg_sq"], state["exp_avg_sq"])
                    assert opts[name].state[p]["step"] == state["step"] + 1
                opts[name].undo_step_counts()
                assert all(opts[name].state[p]["step"] == state["step"] for p, (_, state) in zip(params, before))
        for a, b in zip(runs["gated"], runs["plain"]):
            assert torch.equal(a, b), step
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opts["gated"].state[a][key], opts["plain"].state[b][key])


def test_step_counts_are_not_read_during_a_step_and_survive_a_reload() -> None:
    """The bias corrections come from a Python mirror of the step counts; after load_state_dict the mirror is
    rebuilt from the loaded tensors."""
    params = make_params()
    opt = MaskedAdamW(groups(params), **HYPER)
    set_grads(params, 0)
    opt.step()
    reads = []
    original = torch.Tensor.item

    def counting_item(self):
        reads.append(self)
        return original(self)

    torch.Tensor.item = counting_item
    try:
        for step in range(1, 3):
            set_grads(params, step)
            opt.step()
    finally:
        torch.Tensor.item = original
    assert reads == []
    twin_params = make_params()
    twin = MaskedAdamW(groups(twin_params), **HYPER)
    with torch.no_grad():
        for a, b in zip(twin_params, params):
            a.copy_(b)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 5):
        set_grads(params, step)
        set_grads(twin_params, step)
        opt.step()
        twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b) and float(twin.state[b]["step"]) == 5
