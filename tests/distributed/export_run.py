"""A few DeepSpeed bf16 steps on a tiny BERT, then the full-precision export checked against the optimizer itself.

Run under `accelerate launch` with a DeepSpeed ZeRO config: `python tests/distributed/export_run.py OUT`. Rank 0
writes OUT/report.json, OUT/state.pt (what `full_precision_state_dict` returned) and OUT/model (`save_model`).

Checks made here, where the engine is alive:
- ZeRO-1/2: every entry equals the slice of the fp32 master partitions gathered the obvious way (all-gather of each
  group's flat partition, concatenated in rank order, cut at the group's parameter offsets);
- every stage: every trainable entry rounded to the module's 16-bit dtype equals the module's own 16-bit weight
  (DeepSpeed's 16-bit weights are the master weights rounded after each step), and every entry is float32.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from uegr_dist.engine.export import full_precision_state_dict, save_model


def main(out: Path) -> None:
    accelerator = Accelerator(mixed_precision="bf16", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    # Small steps: most updates are below a weight's bf16 spacing, so the fp32 master and its bf16 copy differ.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, 64, (32, 12))
    labels = torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(ids, labels), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for step, (batch_ids, batch_labels) in enumerate(loader):
        loss = model(input_ids=batch_ids, labels=batch_labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            break

    engine = model
    stage = engine.zero_optimization_stage()
    state = full_precision_state_dict(accelerator, engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    checks: dict[str, object] = {"stage": stage, "world_size": dist.get_world_size()}

    if stage in (1, 2):
        zopt = engine.optimizer
        mismatched = []
        for g, partition in enumerate(zopt.single_partition_of_fp32_groups):
            group = zopt.real_dp_process_group[g]
            parts = [torch.empty_like(partition) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, partition.detach().contiguous(), group=group)
            flat = torch.cat(parts)
            for param, offset in zip(zopt.round_robin_bit16_groups[g], zopt.round_robin_bit16_offsets[g]):
                want = flat[offset : offset + param.numel()].view(param.shape)
                if not torch.equal(state[names[id(param)]], want):
                    mismatched.append(names[id(param)])
        checks["master_mismatches"] = mismatched
        checks["master_checked"] = len(names)

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    gathered = __import__("deepspeed").zero.GatheredParameters(trainable) if stage == 3 else contextlib.nullcontext()
    with gathered:
        if accelerator.is_main_process:
            rounding, not_bf16, total = [], 0, 0
            for name, param in engine.module.named_parameters():
                saved = state[name]
                if not torch.equal(saved.to(param.dtype), param.data.to("cpu")):
                    rounding.append(name)
                not_bf16 += int((saved != saved.to(torch.bfloat16).float()).sum())
                total += saved.numel()
            checks["module_dtype"] = str(next(engine.module.parameters()).dtype)
            checks["rounding_mismatches"] = rounding
            checks["not_bf16_fraction"] = not_bf16 / total
            checks["dtypes"] = sorted({str(t.dtype) for t in state.values() if t.is_floating_point()})
    save_model(accelerator, engine, out / "model")
    if accelerator.is_main_process:
        torch.save({k: v.clone() for k, v in state.items()}, out / "state.pt")
        (out / "report.json").write_text(json.dumps(checks, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
