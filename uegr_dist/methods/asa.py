"""ASA: adversarial self-attention. An adversary built from each layer's own query/key projections masks attention
units; a gradient-reversal layer makes it maximize the divergence it causes, under a budget.

Wu & Zhao, "Adversarial Self-Attention for Language Understanding", AAAI 2023 (arXiv 2206.12608).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.forward import at_least_float32, symmetric_kl
from uegr_dist.forward.attention import AttentionRoute, check_attention, original_attention, route_attention
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss

# Additive attention bias of a masked unit (the BERT convention for padding).
MASKED_BIAS = -1e4
_PREFIX = "asa_"


class _GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """x unchanged; the gradient flowing back through it is negated."""
    return _GradientReversal.apply(x)


def straight_through_mask(scores: torch.Tensor) -> torch.Tensor:
    """Hard mask 1[sigmoid(scores) > 0.5] with the gradient of sigmoid(scores) (straight-through), same shape."""
    soft = torch.sigmoid(scores)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """BERT / RoBERTa style self-attention modules (`query`, `key` linears, head count and size)."""
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "query", None), nn.Linear)
        and isinstance(getattr(m, "key", None), nn.Linear)
        and hasattr(m, "num_attention_heads")
        and hasattr(m, "attention_head_size")
    ]
    if not found:
        raise ConfigError(
            f"method.name = asa: {type(model).__name__} has no BERT/RoBERTa-style self-attention (query/key "
            "linears); ASA supports BERT and RoBERTa (DeBERTa-v2's disentangled attention is not supported)"
        )
    return found


def additive_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """transformers' attention mask (bool, True = attend, or additive float; [B, 1, S, S] or None) as an additive
    float32 mask (float64 for a float64 `like`)."""
    dtype = at_least_float32(like).dtype
    if attention_mask is None:
        return torch.zeros((), dtype=dtype, device=like.device)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, 0.0, torch.finfo(torch.float32).min).to(dtype)
    return attention_mask.to(dtype)


class ASA(Method):
    """L = task(f(x), y) + 0.5 * (KL(P || P_adv) + KL(P_adv || P)) + tau^2 * budget.

    In every layer of the adversarial pass, S = (q~ k~^T) * d^-1/2 with q~ = W_Q sg(h) + b_Q, k~ = W_K sg(h) + b_K
    (the layer's own projections on the detached hidden states h entering the layer in that pass; one score per
    head and query-key pair), M = 1[sigmoid(S) > 0.5] with a straight-through gradient (1 = unit removed). The
    adversarial attention adds GRL(M) * (-1e4) to the scores, GRL a gradient-reversal layer: the projections get
    the *negated* divergence gradient through this path, i.e. they learn to mask the units that hurt most, while
    the rest of the network is trained to resist. budget = mean over layers, examples, heads and real queries of
    the number of real keys masked; it enters without reversal, so the adversary also keeps its masks few.
    Clean and adversarial passes run as ONE forward of the batch stacked [x; x] (independent dropout masks).
    Defaults: tau = 0.5 (`method.asa.tau`). Inference and the saved model use plain attention.

    Deviations / choices: the adversary shares W_Q, W_K with the model (no extra parameters: our reading of the
    paper); the scores come from the adversarial pass's own hidden states; the budget normalization (mean count of
    masked keys per query) is ours. Regression: squared difference of the two predictions replaces the KL terms.
    Supported: BERT and RoBERTa with eager or sdpa attention. With dropout off the step is deterministic, so 2
    processes equal 1; dropout uses torch's generator.
    """

    name = "asa"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.tau = cfg.asa.tau
        self._active = False
        self._token_mask: torch.Tensor | None = None
        self._budgets: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._route: AttentionRoute | None = None

    def setup(self, ctx: MethodContext) -> None:
        """Route attention through the ASA function and stash each self-attention input while a step runs."""
        super().setup(ctx)
        modules = self_attention_modules(ctx.base_model)
        try:
            check_attention(ctx.base_model, "method.name = asa")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._route = route_attention(ctx.base_model, _PREFIX, _make_asa_attention)
        for module in modules:
            module._asa_method = self
            self._handles.append(module.register_forward_pre_hook(_stash_hidden, with_kwargs=True))

    def adversarial_bias(self, module: nn.Module, hidden: torch.Tensor, scaling: float) -> torch.Tensor:
        """hidden [2B, S, D] of the stacked pass -> additive bias [2B, H, S, S]: 0 on the clean half, GRL(M) * -1e4
        on the adversarial half; records this layer's budget."""
        assert self._token_mask is not None
        rows, length = hidden.shape[0] // 2, hidden.shape[1]
        heads, size = module.num_attention_heads, module.attention_head_size
        adv_hidden = hidden[rows:].detach()
        query = module.query(adv_hidden).view(rows, length, heads, size).transpose(1, 2)
        key = module.key(adv_hidden).view(rows, length, heads, size).transpose(1, 2)
        query, key = at_least_float32(query), at_least_float32(key)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, S, S]
        token = self._token_mask.to(device=hidden.device, dtype=scores.dtype)
        mask = straight_through_mask(scores) * token[:, None, None, :]
        per_query = mask.sum(dim=-1)  # [B, H, S] masked real keys per query
        weight = token[:, None, :].expand_as(per_query)
        self._budgets.append((per_query * weight).sum() / weight.sum().clamp(min=1.0))
        adversarial = reverse_gradient(mask) * MASKED_BIAS
        return torch.cat([torch.zeros_like(adversarial), adversarial])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Clean task loss + symmetric KL to the adversarially masked pass + tau^2 * mask budget."""
        labels = batch["labels"]
        stacked = {name: torch.cat([value, value]) for name, value in model_inputs(batch).items()}
        self._active, self._token_mask, self._budgets = True, batch["attention_mask"], []
        try:
            logits = model(**stacked).logits
        finally:
            self._active, self._token_mask = False, None
        budgets, self._budgets = self._budgets, []
        clean, adversarial = logits.view(2, labels.shape[0], -1)
        task = task_loss(clean, labels)
        if clean.shape[-1] == 1:
            divergence = (at_least_float32(clean[:, 0]) - at_least_float32(adversarial[:, 0])).pow(2).mean()
        else:
            divergence = 0.5 * symmetric_kl(clean, adversarial).mean()
        budget = torch.stack(budgets).mean()
        loss = task + divergence + self.tau**2 * budget
        logs = {"task_loss": task.detach(), "asa_kl": divergence.detach(), "asa_masked_per_query": budget.detach()}
        return StepOutput(loss, clean.detach(), logs)

    def teardown(self) -> None:
        """Plain attention again: hooks removed, original attention implementations restored."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._route is not None:
            self._route.remove()
        for module in self_attention_modules(self.ctx.base_model):
            module.__dict__.pop("_asa_method", None)
            module.__dict__.pop("_asa_hidden", None)


def _stash_hidden(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: keep the self-attention input [2B, S, D] for the attention function (during ASA steps)."""
    method = getattr(module, "_asa_method", None)
    if method is not None and method._active:
        module._asa_hidden = args[0] if args else kwargs["hidden_states"]


def _make_asa_attention(implementation: str):
    def asa_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original attention, plus the adversary's bias on the adversarial half during an ASA step."""
        original = original_attention(module, implementation)
        hidden = module.__dict__.pop("_asa_hidden", None)
        method = getattr(module, "_asa_method", None)
        if hidden is None or method is None or not method._active:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = query.size(-1) ** -0.5 if scaling is None else scaling
        bias = additive_mask(attention_mask, query) + method.adversarial_bias(module, hidden, scale)
        return original(module, query, key, value, bias.to(query.dtype), dropout=dropout, scaling=scaling, **kwargs)

    asa_attention.__name__ = f"asa_{implementation}_attention"
    return asa_attention
