"""MaskedAdamW equals torch.optim.AdamW without masks and freezes masked coordinates (value and moments) with them."""

from __future__ import annotations

import copy

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
        opt.set_update_masks({params[0]: torch.ones(params[0].shape)})
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
