"""Embedding-space PGD: accuracy when each example's input embeddings may move within an L2 or Linf eps-ball.

Method (monotone by construction): for every eps (ascending) the adversary starts from the same keyed random
direction scaled to eps and takes `steps` normalized gradient-ascent steps of `step_size * eps`
(`uegr_dist.forward.adversary.perturb_embeddings`). An example counts as broken at eps if the PGD adversary at eps
fools the model *or* it was broken at a smaller eps (that adversary lies inside the larger ball too), or the clean
prediction was already wrong. So accuracy never increases with eps, and at eps = 0 (no perturbation) it is the
clean accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from uegr_dist.forward.adversary import perturb_embeddings
from uegr_dist.rng import mix_key
from uegr_dist.robustness.examples import Example
from uegr_dist.robustness.victim import Victim

_NORM_STREAM = {"l2": 1, "linf": 2}


def pgd_batch(
    victim: Victim,
    examples: list[Example],
    clean_predictions: list[int],
    norm: str,
    eps_values: list[float],
    steps: int,
    step_size: float,
    seed: int,
) -> list[dict[str, Any]]:
    """One batch of examples -> a JSONL row per example: predictions and correctness at every eps (ascending)."""
    model = victim.model
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    inputs = victim.encode(texts, pairs)  # type: ignore[arg-type]
    input_ids = inputs.pop("input_ids")
    mask = inputs["attention_mask"]
    labels = torch.tensor([e.label for e in examples], device=victim.device)
    row_keys = torch.tensor([e.index for e in examples], dtype=torch.long, device=victim.device)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)

    def logits_of(perturbed: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=perturbed, **inputs).logits.float()

    broken = torch.tensor([p != e.label for p, e in zip(clean_predictions, examples)], device=victim.device)
    rows: list[dict[str, Any]] = [
        {"index": e.index, "label": e.label, "clean_prediction": p, "eps": [], "prediction": [], "correct": []}
        for e, p in zip(examples, clean_predictions)
    ]
    for eps in sorted(eps_values):
        if eps == 0:
            delta = torch.zeros_like(embeds)
        else:
            delta = perturb_embeddings(
                lambda e: F.cross_entropy(logits_of(e), labels, reduction="sum"),
                embeds,
                mask,
                eps=eps,
                step_size=step_size * eps,
                steps=steps,
                norm=norm,
                init_scale=eps,
                row_keys=row_keys,
                key=mix_key(seed, _NORM_STREAM[norm]),
            )
        with torch.no_grad():
            predictions = logits_of(embeds + delta).argmax(dim=-1)
        victim.queries += len(examples) * (steps + 1 if eps > 0 else 1)
        broken = broken | (predictions != labels)
        for row, pred, is_broken in zip(rows, predictions.tolist(), broken.tolist()):
            row["eps"].append(eps)
            row["prediction"].append(pred)
            row["correct"].append(not is_broken)
    return rows
