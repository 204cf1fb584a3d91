"""Gradient-transform and multi-pass methods (ChildTuning-D, ChildTuning-F, RoAST, SAM / mSAM / ASAM, MAT): one
step of each on a tiny float64 model equals a slow reference written from the paper's equations (same loss, same
parameters after the update); each trains end to end through `train()`; bad options fail at start-up."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import method_context, method_preset, tiny_dropout_free_model, tiny_run_overrides, zero3_backend
from uegr_dist.backward import SelectiveAdamW
from uegr_dist.config import ConfigError, load_config
from uegr_dist.engine.train_loop import train
from uegr_dist.methods import TrainingData, build_method
from uegr_dist.methods.childtuning_f import CHILDTUNING_F_STREAM
from uegr_dist.methods.mat import _THETA_NOISE_STREAM as MAT_THETA_NOISE_STREAM
from uegr_dist.methods.roast import ROAST_STREAM
from uegr_dist.rng import keyed_uniform_flat, mix_key

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WEIGHT_DECAY, SEED = 1e-2, 0.01, 3
ENCODER = r"(?:^|\.)layers?\.\d+\."


class OneProcess:
    """The two accelerator calls a method's forward_backward makes, for one process without mixed precision."""

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def tiny_model(arch: str = "bert") -> torch.nn.Module:
    return tiny_dropout_free_model(arch).double()


def examples(n: int, seed: int, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 60, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        mask[int(torch.randint(4, seq + 1, (1,), generator=gen)) :] = 0
        label = torch.randint(0, 3, (), generator=gen)
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": label, "sample_id": torch.tensor(i)})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


DATA = examples(12, seed=1)


def ce(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective every reference uses: mean cross-entropy of one ordinary forward (in float64, as the engine's
    task loss of a float64 model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def run_method(method_cfg: dict, batches: list[dict], steps_per_epoch: int = 100):
    """The fast path: build the method, set it up on a tiny model and run len(batches) steps as the loop does."""
    model = tiny_model()
    cfg = load_config(None, {"method": method_cfg}).method
    method = build_method(cfg)
    optimizer = SelectiveAdamW(
        model.named_parameters(), lr=LR, weight_decay=WEIGHT_DECAY, mask=method.gradient_mask(SEED)
    )
    method.setup(method_context(model, optimizer, seed=SEED, data=TrainingData(DATA, collate, steps_per_epoch)))
    losses, logs = [], []
    for step, batch in enumerate(batches):
        result = method.forward_backward(OneProcess(), model, batch, step, step)
        optimizer.step()  # masks the gradient in place, then updates
        stats = optimizer.last_mask_stats
        logs.append({} if stats is None else {"mask_kept_fraction": stats.keep_fraction})
        logs[-1]["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        losses.append(result.loss.item())
    return model, losses, logs


def reference_adamw_step(model: torch.nn.Module, grads: dict[str, torch.Tensor], optimizer=None, fast_grads=None):
    """Check the method's gradient against `grads` (both float64; the loss itself is float32), set .grad and take one
    torch.optim.AdamW step (the optimizer is reused across steps)."""
    if fast_grads is not None:
        largest = max(float(grad.abs().max()) for grad in grads.values())
        for name, grad in grads.items():
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-6, atol=1e-7 * largest, msg=name)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    optimizer.step()
    return optimizer


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(model.named_parameters(), grads)}


def reference_fisher(model: torch.nn.Module, names: list[str], batch_size: int) -> torch.Tensor:
    """F = mean over the batches (dataset order) of the squared batch gradient, flattened over `names` in order."""
    batches = [collate(DATA[i : i + batch_size]) for i in range(0, len(DATA), batch_size)]
    total = None
    for batch in batches:
        grads = gradients(model, ce(model, batch))
        flat = torch.cat([grads[n].reshape(-1) for n in names]) ** 2
        total = flat if total is None else total + flat
    return total / len(batches)


@torch.no_grad()
def assert_same_model(fast: torch.nn.Module, reference: torch.nn.Module, atol: float = 1e-10) -> None:
    worst = max(
        float((p - q).abs().max()) for (_, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters())
    )
    assert worst <= atol, worst


def apply_flat(grads: dict[str, torch.Tensor], names: list[str], factors: torch.Tensor) -> None:
    start = 0
    for name in names:
        n = grads[name].numel()
        grads[name] = grads[name] * factors[start : start + n].view_as(grads[name])
        start += n


BATCH = collate(DATA[:6])


def test_childtuning_d_equals_reference():
    fast, losses, logs = run_method(
        {"name": "childtuning_d", "childtuning": {"reserve_p": 0.3, "fisher_batch_size": 5}}, [BATCH]
    )
    model = tiny_model()
    names = [n for n, _ in model.named_parameters() if re.search(ENCODER, n)]
    fisher = reference_fisher(model, names, batch_size=5)
    k = math.ceil(0.3 * fisher.numel())
    child = torch.zeros(fisher.numel(), dtype=torch.float64)
    child[torch.argsort(fisher, descending=True, stable=True)[:k]] = 1.0
    loss = ce(model, BATCH)
    grads = gradients(model, loss)
    apply_flat(grads, names, child)  # only encoder layers are masked; embeddings and head always update
    reference_adamw_step(model, grads, fast_grads=logs[0]["grads"])

    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    assert logs[0]["mask_kept_fraction"] == pytest.approx(k / fisher.numel())
    assert_same_model(fast, model)


def test_childtuning_f_equals_reference_and_p_one_is_vanilla():
    batches = [BATCH, collate(DATA[6:])]
    fast, losses, fast_logs = run_method({"name": "childtuning_f", "childtuning": {"p_f": 0.4}}, batches)
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]  # every trainable parameter, as the official code
    numel = sum(p.numel() for p in model.parameters())
    optimizer = None
    for step, batch in enumerate(batches):
        loss = ce(model, batch)
        assert losses[step] == pytest.approx(loss.item(), rel=1e-6)
        grads = gradients(model, loss)
        uniform = keyed_uniform_flat(mix_key(SEED, CHILDTUNING_F_STREAM, step), 0, numel).double()
        apply_flat(grads, names, (uniform < 0.4).double() / 0.4)
        optimizer = reference_adamw_step(model, grads, optimizer, fast_logs[step]["grads"])
    assert_same_model(fast, model)

    vanilla, _, _ = run_method({"name": "vanilla"}, batches)
    plain, _, logs = run_method({"name": "childtuning_f", "childtuning": {"p_f": 1.0}}, batches)
    assert logs[0]["mask_kept_fraction"] == 1.0
    assert_same_model(plain, vanilla, atol=0.0)


def reference_rank(importance: torch.Tensor) -> torch.Tensor:
    """Average relative rank (1 = largest) of the importance rounded down to its top 16 bits (2**-7 relative)."""
    bits = importance.float().view(torch.int32) >> 16
    ordered = torch.sort(bits).values
    smaller = torch.searchsorted(ordered, bits, right=False)
    equal = torch.searchsorted(ordered, bits, right=True) - smaller
    return (smaller.double() + (equal.double() - 1) / 2) / (importance.numel() - 1)


@pytest.mark.parametrize(("scale", "redraw"), [(False, "step"), (True, "epoch")])
def test_roast_equals_reference_over_two_epochs(scale, redraw):
    alpha, beta = 0.6, 4.0
    batches = [BATCH, collate(DATA[6:])]
    options = {"alpha": alpha, "beta": beta, "scale": scale, "redraw": redraw}
    fast, losses, logs = run_method(
        {"name": "roast", "roast": options, "childtuning": {"fisher_batch_size": 4}}, batches, steps_per_epoch=1
    )
    model = tiny_model()
    names = [n for n, _ in model.named_parameters() if re.search(ENCODER, n)]
    importance = reference_fisher(model, names, batch_size=4)  # epoch 0: the pre-pass
    optimizer = None
    for step, batch in enumerate(batches):  # one step per epoch: step = epoch
        loss = ce(model, batch)
        assert losses[step] == pytest.approx(loss.item(), rel=1e-6)
        grads = gradients(model, loss)
        prob = torch.sigmoid(2 * beta * (reference_rank(importance) - alpha))
        uniform = keyed_uniform_flat(mix_key(SEED, ROAST_STREAM, step), 0, prob.numel()).double()
        keep = (uniform < prob).double()
        next_importance = torch.cat([grads[n].reshape(-1) for n in names]) ** 2  # this epoch's mean g^2
        apply_flat(grads, names, keep / prob if scale else keep)
        optimizer = reference_adamw_step(model, grads, optimizer, logs[step]["grads"])
        assert logs[step]["mask_kept_fraction"] == pytest.approx(float(keep.mean()))
        importance = next_importance
    # p is float32 in the method: 1 / p rescaling differs from float64 at 1e-7 relative; a flipped draw would be ~LR.
    assert_same_model(fast, model, atol=1e-8)


def sam_reference(model, batch, rho, adaptive=False, eta=0.01):
    """eps = rho g / ||g|| (ASAM: rho T^2 g / ||T g||, T = |w| + eta on weights); gradient at theta + eps."""
    params = dict(model.named_parameters())
    loss = ce(model, batch)
    grads = gradients(model, loss)
    scale = {n: p.detach().abs() + eta if adaptive and "weight" in n else torch.ones_like(p) for n, p in params.items()}
    norm = torch.sqrt(sum(((scale[n] * g) ** 2).sum() for n, g in grads.items()))
    eps = {n: rho * scale[n] ** 2 * g / norm for n, g in grads.items()}
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in perturbed.named_parameters():
            p.add_(eps[n])
    return loss, gradients(perturbed, ce(perturbed, batch))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_equal_reference(adaptive):
    rho = 0.5 if adaptive else 0.05
    fast, losses, logs = run_method({"name": "sam", "sam": {"rho": rho, "adaptive": adaptive}}, [BATCH])
    model = tiny_model()
    loss, grads = sam_reference(model, BATCH, rho, adaptive)
    reference_adamw_step(model, grads, fast_grads=logs[0]["grads"])
    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    assert_same_model(fast, model)
    moved = dict(tiny_model().named_parameters())
    assert any(not torch.equal(p, moved[n]) for n, p in fast.named_parameters())


def test_msam_equals_size_weighted_mean_of_shard_sam_gradients():
    rho, m = 0.1, 4
    fast, losses, logs = run_method({"name": "sam", "sam": {"rho": rho, "m_shards": m}}, [BATCH])
    model = tiny_model()
    shards = torch.arange(6).tensor_split(m)  # sizes 2, 2, 1, 1
    total, first = None, 0.0
    for index in shards:
        shard = {k: v[index] for k, v in BATCH.items()}
        loss, grads = sam_reference(model, shard, rho)
        weight = index.numel() / 6
        first += weight * loss.item()
        scaled = {n: weight * g for n, g in grads.items()}
        total = scaled if total is None else {n: total[n] + scaled[n] for n in total}
    reference_adamw_step(model, total, fast_grads=logs[0]["grads"])
    assert losses[0] == pytest.approx(first, rel=1e-6)
    # The shard losses are float32 (weights applied before / after the float32 loss): gradients agree to 1e-7
    # relative, which AdamW's g / sqrt(g^2) turns into ~1e-6 on coordinates with near-zero gradients.
    assert_same_model(fast, model, atol=1e-5)


def test_mat_equals_reference_sgld():
    options = {"k_delta": 2, "k_theta": 3, "eta_delta": 0.5, "eta_theta": 0.05, "sigma_delta": 1e-3,
               "sigma_theta": 1e-3, "init_std": 1e-2, "lambda_s": 2.0, "beta": 0.3}  # fmt: skip
    fast, losses, logs = run_method({"name": "mat", "mat": options}, [BATCH])
    assert all(grad is None for grad in logs[0]["grads"].values())  # MAT updates theta itself; AdamW has nothing

    model = tiny_model()  # same seed as the fast path: the perturbation's random numbers come in the same order
    o = options
    params = dict(model.named_parameters())
    ids, mask, labels = BATCH["input_ids"], BATCH["attention_mask"], BATCH["labels"]
    token = mask.double().unsqueeze(-1)

    def logits(embeds):
        return model(inputs_embeds=embeds, attention_mask=mask).logits

    def sym_kl(a, b):
        pa, pb = a.double().softmax(-1), b.double().softmax(-1)
        return ((pa * (pa.log() - pb.log())).sum(-1) + (pb * (pb.log() - pa.log())).sum(-1)).mean()

    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        clean = logits(embeds)
    delta = torch.randn_like(embeds) * o["init_std"] * token
    delta_bar = delta.clone()
    for _ in range(o["k_delta"]):  # SGLD ascent on delta, f(x) fixed
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(sym_kl(logits(embeds + delta), clean), [delta])
        noise = torch.randn_like(delta) * math.sqrt(2 * o["eta_delta"]) * o["sigma_delta"]
        delta = (delta.detach() + o["eta_delta"] * grad + noise) * token
        delta_bar = o["beta"] * delta_bar + (1 - o["beta"]) * delta
    theta_0 = {n: p.detach().clone() for n, p in params.items()}
    theta_bar = {n: p.clone() for n, p in theta_0.items()}
    generator = torch.Generator().manual_seed(mix_key(SEED, MAT_THETA_NOISE_STREAM, 0) & (2**63 - 1))
    first = None
    for _ in range(o["k_theta"]):  # SGLD descent on theta, then the EMA
        embeds = model.get_input_embeddings()(ids)
        clean = logits(embeds)
        loss = F.cross_entropy(clean.double(), labels)
        first = loss.item() if first is None else first
        grads = torch.autograd.grad(
            loss + o["lambda_s"] * sym_kl(logits(embeds + delta_bar), clean), list(params.values())
        )
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= o["eta_theta"] * g
            for p in params.values():
                p += torch.randn(p.shape, generator=generator) * math.sqrt(2 * o["eta_theta"]) * o["sigma_theta"]
            for n, p in params.items():
                theta_bar[n] = o["beta"] * theta_bar[n] + (1 - o["beta"]) * p
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(o["beta"] * theta_0[n] + (1 - o["beta"]) * theta_bar[n])

    assert losses[0] == pytest.approx(first, rel=1e-6)
    assert_same_model(fast, model, atol=1e-9)
    assert max(float((p.detach() - theta_0[n]).abs().max()) for n, p in fast.named_parameters()) > 1e-3


def perturbed_gradients(model, batch, eps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the mean cross-entropy at theta + eps (on a copy of the model)."""
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in perturbed.named_parameters():
            p.add_(eps[n])
    return gradients(perturbed, ce(perturbed, batch))


def delta_sam_reference(model, batch, rho, tau, score):
    """Delta-SAM from its definition, with B backward passes where the method needs none: s_i from the autograd
    gradient of l_i with respect to the logits (or l_i), lambda = softmax(s / tau), g_w = sum_i lambda_i grad l_i from
    per-example gradients, eps = rho g_w / ||g_w||; the gradient of the mean loss at theta + eps."""
    names = [n for n, _ in model.named_parameters()]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    scores, per_example = [], []
    for i in range(losses.numel()):
        (dz,) = torch.autograd.grad(losses[i], logits, retain_graph=True)
        scores.append(dz[i].norm() if score == "grad_norm" else losses[i].detach())
        grads = torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True, allow_unused=True)
        per_example.append([torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)])
    lam = torch.softmax(torch.stack(scores) / tau, dim=0)
    g_w = {n: sum(lam[i] * per_example[i][k] for i in range(len(per_example))) for k, n in enumerate(names)}
    norm = torch.sqrt(sum((g**2).sum() for g in g_w.values()))
    eps = {n: rho * g / norm for n, g in g_w.items()}
    return losses.mean(), perturbed_gradients(model, batch, eps), lam


@pytest.mark.parametrize(("score", "tau"), [("grad_norm", 0.02), ("loss", 0.05)])
def test_delta_sam_equals_reference(score, tau):
    rho = 0.1
    fast, losses, logs = run_method(
        {"name": "delta_sam", "delta_sam": {"rho": rho, "temperature": tau, "score": score}}, [BATCH]
    )
    model = tiny_model()
    loss, grads, lam = delta_sam_reference(model, BATCH, rho, tau, score)
    assert float(lam.max() / lam.min()) > 1.5  # the weights do differ across the batch
    reference_adamw_step(model, grads, fast_grads=logs[0]["grads"])
    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    assert_same_model(fast, model)


def test_delta_sam_with_a_large_temperature_is_sam():
    delta, _, _ = run_method({"name": "delta_sam", "delta_sam": {"rho": 0.1, "temperature": 1e12}}, [BATCH, BATCH])
    sam, _, _ = run_method({"name": "sam", "sam": {"rho": 0.1}}, [BATCH, BATCH])
    assert_same_model(delta, sam, atol=1e-12)


def fisher_sam_reference(model, batch, rho, eta):
    """eps = rho F^-1 g / sqrt(g^T F^-1 g), F = diag(1 + eta g^2) of the batch gradient g."""
    loss = ce(model, batch)
    g = gradients(model, loss)
    fisher = {n: 1.0 + eta * gi**2 for n, gi in g.items()}
    quadratic = sum((gi * gi / fisher[n]).sum() for n, gi in g.items())
    eps = {n: rho * (gi / fisher[n]) / torch.sqrt(quadratic) for n, gi in g.items()}
    return loss, perturbed_gradients(model, batch, eps)


def test_fisher_sam_equals_reference_and_eta_zero_is_sam():
    # eta large enough that 1 + eta g^2 differs from 1 on the larger coordinates of the tiny model's gradient.
    rho, eta = 0.2, 1e4
    fast, losses, logs = run_method({"name": "fisher_sam", "fisher_sam": {"rho": rho, "eta": eta}}, [BATCH])
    model = tiny_model()
    loss, grads = fisher_sam_reference(model, BATCH, rho, eta)
    reference_adamw_step(model, grads, fast_grads=logs[0]["grads"])
    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    # The method's 1e-12 floor under sqrt(g^T F^-1 g) (about 1e-2 here) shifts eps by 1e-10 relative.
    assert_same_model(fast, model, atol=1e-9)
    _, sam_grads = sam_reference(tiny_model(), BATCH, rho)
    assert max(float((grads[n] - sam_grads[n]).abs().max()) for n in grads) > 1e-6  # eta changes the step

    plain, _, _ = run_method({"name": "fisher_sam", "fisher_sam": {"rho": rho, "eta": 0.0}}, [BATCH, BATCH])
    sam, _, _ = run_method({"name": "sam", "sam": {"rho": rho}}, [BATCH, BATCH])
    assert_same_model(plain, sam, atol=1e-12)


def awp_reference(model, objective, gamma, steps):
    """AWP from the paper's equations: v = 0; `steps` times v_l <- v_l + gamma ||w_l|| g_l / ||g_l|| with
    g = grad rho(w + v), then v_l onto ||v_l|| <= gamma ||w_l||, for the weight tensors (2+ dimensions); returns
    rho(w) and the gradient of rho at w + v (all parameters), with the model back at w."""
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    start = {n: p.detach().clone() for n, p in weights.items()}
    radius = {n: gamma * w.norm() for n, w in start.items()}
    v = {n: torch.zeros_like(w) for n, w in start.items()}
    first = None
    for _ in range(steps):
        loss = objective(model)
        first = loss.item() if first is None else first
        grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
        with torch.no_grad():
            for n in weights:
                v[n] = v[n] + radius[n] * grads[n] / grads[n].norm()
                if v[n].norm() > radius[n]:
                    v[n] = v[n] * radius[n] / v[n].norm()
                weights[n].copy_(start[n] + v[n])
    grads = gradients(model, objective(model))
    with torch.no_grad():
        for n, p in weights.items():
            p.copy_(start[n])
    return first, grads


AWP_CASES = {
    "vanilla": {"rng": "keyed"},
    "uegr": {"rng": "keyed", "mask": {"enabled": False}, "adversary": {"eps": 0.05, "step_size": 0.05}},
    "freelb": {"rng": "keyed", "freelb": {"steps": 2, "init_mag": 0.05, "adv_lr": 0.05}},
}


@pytest.mark.parametrize(("objective", "steps"), [("vanilla", 1), ("vanilla", 3), ("uegr", 1), ("freelb", 2)])
def test_awp_equals_reference(objective, steps):
    gamma = 0.02
    options = {"name": "awp", "awp": {"objective": objective, "gamma": gamma, "steps": steps}, **AWP_CASES[objective]}
    fast, losses, logs = run_method(options, [BATCH])
    model = tiny_model()
    inner = build_method(load_config(None, {"method": {**options, "name": objective}}).method)
    inner.setup(method_context(model, seed=SEED))  # the objective with its own (keyed) draws, on the reference model
    first, grads = awp_reference(model, lambda m: inner.loss(m, BATCH, 0, 0).loss, gamma, steps)
    inner.teardown()
    reference_adamw_step(model, grads, fast_grads=logs[0]["grads"])
    assert losses[0] == pytest.approx(first, rel=1e-6)
    assert_same_model(fast, model)


def test_awp_advances_the_objectives_state_once_per_step():
    """UEGR's adaptive dropout-rate controller is updated by each pass of the objective; AWP puts its state back
    after the ascent passes, so one step moves it by the update of the pass at w + v only."""
    options = {"name": "awp", "awp": {"objective": "uegr", "steps": 2}, "dropout": {"schedule": "adaptive"}}
    method = build_method(load_config(None, {"method": options}).method)
    model = tiny_model()
    method.setup(method_context(model, SelectiveAdamW(model.named_parameters(), lr=LR), seed=SEED))
    schedule = method.objective.schedule
    alone = copy.deepcopy(schedule)
    measured = []
    observe = schedule.observe  # the measurement reaches the shift at the next rates() / state_dict()
    schedule.observe = lambda js: (measured.append(float(js)), observe(js))[1]
    method.forward_backward(OneProcess(), model, BATCH, 0, 0)
    assert len(measured) == 3  # two ascent passes and the pass at w + v
    alone.update(measured[-1])
    assert schedule.state_dict()["shift"] == alone.shift != 0.0


def test_awp_uses_its_objectives_gradient_mask():
    cfg = load_config(None, {"method": {"name": "awp", "awp": {"objective": "uegr"}, "mask": {"ratio": 0.2}}}).method
    assert build_method(cfg).gradient_mask(SEED) == build_method(dataclasses.replace(cfg, name="uegr")).gradient_mask(
        SEED
    )
    assert build_method(load_config(None, {"method": {"name": "awp"}}).method).gradient_mask(SEED) is None


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("mat", {"mat": {"eta_theta": 0.05, "k_theta": 1}}),
        ("childtuning_d", {}),
        ("childtuning_f", {"childtuning": {"p_f": 0.5}}),
        ("roast", {"roast": {"alpha": 0.5, "beta": 5.0}}),
        ("sam", {}),
        ("sam", {"sam": {"m_shards": 2, "adaptive": True, "rho": 0.2}}),
        ("delta_sam", {}),
        ("fisher_sam", {"fisher_sam": {"rho": 0.05}}),  # the default 0.1 is too far for the tiny random model
        ("awp", {}),  # around UEGR and FreeLB: the presets' runs below and the distributed launches
    ],
)
def test_method_trains_end_to_end(method, extra, easy_task, tmp_path):
    cfg = tiny_run_overrides("bert", easy_task, tmp_path / "run", train__save_model=False)
    cfg["method"] = {"name": method, **extra}
    result = train(load_config(None, cfg))
    losses = [entry["loss"] for entry in result.metrics["train_loss"]]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    if method == "mat":  # plain SGLD (no Adam) moves the tiny random model but does not learn it in 16 steps
        assert len({round(x, 6) for x in losses}) > 1
        return
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.metrics["final"]["accuracy"] >= 0.75
    if method not in ("sam", "delta_sam", "fisher_sam", "awp"):
        assert 0.0 < result.metrics["train_loss"][-1]["mask_kept_fraction"] < 1.0


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# Run name (as in docs/methods.md's support table) -> method config.
BF16_ONE_PROCESS = {
    "childtuning_d": {"name": "childtuning_d"},
    "childtuning_f": {"name": "childtuning_f"},
    "roast": {"name": "roast"},
    "sam": {"name": "sam"},
    "asam": {"name": "sam", "sam": {"rho": 0.5, "adaptive": True}},
    "msam": {"name": "sam", "sam": {"m_shards": 2}},
    "mat": {"name": "mat"},
    "delta_sam": {"name": "delta_sam"},
    "fisher_sam": {"name": "fisher_sam"},
    "awp": {"name": "awp"},
    "awp_uegr": {"name": "awp", "awp": {"objective": "uegr"}},
    "awp_freelb": {"name": "awp", "awp": {"objective": "freelb"}},
}


@pytest.mark.parametrize("run", sorted(BF16_ONE_PROCESS))
def test_method_runs_under_bf16_autocast(run, easy_task, tmp_path, fresh_accelerator_state):
    cfg = tiny_run_overrides("bert", easy_task, tmp_path / "run", train__save_model=False, train__max_steps=4)
    cfg["train"]["mixed_precision"] = "bf16"
    cfg["method"] = BF16_ONE_PROCESS[run]
    result = train(load_config(None, cfg))
    losses = [entry["loss"] for entry in result.metrics["train_loss"]]
    assert result.metrics["train"]["steps"] == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": {"name": "sam"}, "train": {"grad_accum": 2}}, "train.grad_accum = 2: method sam"),
        ({"method": {"name": "awp"}, "train": {"grad_accum": 2}}, "train.grad_accum = 2: method awp"),
        ({"method": {"name": "delta_sam"}, "train": {"grad_accum": 3}}, "train.grad_accum = 3: method delta_sam"),
        ({"method": {"name": "awp", "awp": {"objective": "rdrop"}}}, "must be one of vanilla, uegr, freelb"),
        ({"method": {"name": "delta_sam", "delta_sam": {"temperature": 0}}}, "temperature = 0.0: must be in (0"),
        ({"method": {"name": "fisher_sam", "fisher_sam": {"eta": -1}}}, "method.fisher_sam.eta = -1.0: must be in"),
        ({"method": {"name": "mat"}, "train": {"grad_accum": 4}}, "train.grad_accum = 4: method mat"),
        ({"method": {"name": "mat", "mat": {"beta": 1.0}}}, "method.mat.beta = 1.0: must be in [0.0, 1.0)"),
        ({"method": {"name": "mat"}, "train": {"mixed_precision": "fp16"}}, "train.mixed_precision = fp16: method mat"),
        ({"method": {"name": "sam", "sam": {"m_shards": 64}}, "train": {"batch_size": 8}}, "must be <= train.batch"),
        ({"method": {"name": "sam", "sam": {"rho": 0}}}, "method.sam.rho = 0.0: must be in (0"),
        ({"method": {"name": "childtuning_d", "childtuning": {"reserve_p": 1.5}}}, "reserve_p = 1.5: must be in (0"),
        ({"method": {"name": "childtuning_f", "childtuning": {"p_f": 0}}}, "method.childtuning.p_f = 0"),
        ({"method": {"name": "roast", "roast": {"include": "layer.("}}}, "method.roast.include = 'layer.(': not a"),
        ({"method": {"name": "roast", "roast": {"redraw": "batch"}}}, "must be one of step, epoch"),
    ],
)
def test_bad_method_options_fail_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_mat_skips_a_step_with_a_non_finite_gradient():
    """A NaN in one descent gradient (here from a hook on one tensor, in the second of 3 SGLD steps): theta is put
    back to theta_0 and the loss returned is NaN, so the loop's guard counts a skipped step."""
    model = tiny_model()
    options = {"name": "mat", "mat": {"k_theta": 3, "eta_theta": 0.05}}
    method = build_method(load_config(None, {"method": options}).method)
    method.setup(method_context(model, seed=SEED))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * math.nan if len(calls) == 2 else grad

    model.classifier.weight.register_hook(poison)
    result = method.forward_backward(OneProcess(), model, BATCH, 0, 0)
    assert len(calls) == 2 and math.isnan(result.loss.item())
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    # The next batch trains normally.
    assert math.isfinite(method.forward_backward(OneProcess(), model, BATCH, 1, 1).loss.item())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_mat_keyed_perturbation_depends_only_on_the_row_and_the_global_batch():
    """With method.rng: keyed, a row's delta_bar is the same whether it is drawn in one process with the whole batch
    or on one of 2 processes with half of it: the draws are keyed by sample id, and the delta gradient is that of the
    global-batch mean (what lets 2 processes reproduce 1; the launch itself is in the distributed tests)."""
    options = {"k_delta": 3, "eta_delta": 0.5, "sigma_delta": 1e-2, "init_std": 1e-2}

    def delta_bar(batch: dict, num_processes: int) -> torch.Tensor:
        model = tiny_model()
        method = build_method(load_config(None, {"method": {"name": "mat", "rng": "keyed", "mat": options}}).method)
        method.setup(method_context(model, seed=SEED, num_processes=num_processes))
        return method._perturbation(batch, micro_step=3)

    whole = delta_bar(collate(DATA[:6]), 1)
    half = delta_bar(collate(DATA[:3]), 2)
    assert whole.abs().max() > 1e-3  # the ascent moved delta away from its tiny start
    torch.testing.assert_close(half, whole[:3], rtol=1e-9, atol=1e-12)
    # The fast generator, by contrast, hands rows numbers by their position in the batch.
    torch.manual_seed(0)
    fast = build_method(load_config(None, {"method": {"name": "mat", "mat": options}}).method)
    model = tiny_model()
    fast.setup(method_context(model, seed=SEED))
    assert not torch.allclose(fast._perturbation(collate(DATA[:6]), micro_step=3)[:3], half)


ZERO3_REFUSED = ["sam", "childtuning_d", "roast", "mat", "delta_sam", "fisher_sam", "awp"]


@pytest.mark.parametrize("method", ZERO3_REFUSED)
def test_zero3_is_refused_at_setup(method):
    model = tiny_model()
    ctx = method_context(model, data=TrainingData(DATA, collate))
    ctx.backend = zero3_backend()
    with pytest.raises(ConfigError, match=f"method.name = {method}: .*ZeRO-3 partitions"):
        build_method(load_config(None, {"method": {"name": method}}).method).setup(ctx)


def test_include_matching_nothing_fails_before_writing(easy_task, tmp_path):
    cfg = tiny_run_overrides("bert", easy_task, tmp_path / "run")
    cfg["method"] = {"name": "childtuning_d", "childtuning": {"include": "no_such_parameter"}}
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        train(load_config(None, cfg))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- presets

# configs/methods preset -> (method name, the settings it changes from the defaults of docs/methods.md).
GRADIENT_PRESETS = {
    "childtuning-d": ("childtuning_d", {}),
    "childtuning-f": ("childtuning_f", {}),
    "roast": ("roast", {}),
    "sam": ("sam", {}),
    "sam-asam": ("sam", {"sam": {"rho": 0.5, "adaptive": True}}),
    "sam-msam": ("sam", {"sam": {"m_shards": 4}}),
    "mat": ("mat", {"mat": {"k_delta": 3, "k_theta": 20}}),
    "delta-sam": ("delta_sam", {}),
    "fisher-sam": ("fisher_sam", {}),
    "awp": ("awp", {}),
    "awp-uegr": ("awp", {"awp": {"objective": "uegr"}}),
    "awp-freelb": ("awp", {"awp": {"objective": "freelb"}}),
}


@pytest.mark.parametrize("preset", sorted(GRADIENT_PRESETS))
def test_gradient_method_presets_load_and_train(preset, easy_task, tmp_path, fresh_accelerator_state):
    """Each ready config of configs/methods is the documented defaults plus what its comment says, and trains."""
    name, changed = GRADIENT_PRESETS[preset]
    run = {"save_model": False, "max_steps": 2}
    cfg = method_preset(preset, easy_task, tmp_path / "run", **run)
    assert cfg.method == load_config(None, {"method": {"name": name, **changed}}).method
    if name == "mat":  # the paper's 20 SGLD steps are for real runs; the tiny run checks the rest of the preset
        cfg = method_preset(preset, easy_task, tmp_path / "run", method={"mat": {"k_theta": 2}}, **run)
    result = train(cfg)
    losses = [entry["loss"] for entry in result.metrics["train_loss"]]
    assert result.metrics["method"] == name and result.metrics["train"]["steps"] == 2
    assert all(math.isfinite(x) for x in losses)
