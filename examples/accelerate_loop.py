"""UEGR in your own Accelerate loop.

This is accelerate's NLP example (`examples/nlp_example.py` in the accelerate repository: a classifier fine-tuned
with AdamW, a linear schedule and `accelerator.prepare`) on local JSON-lines files, with the lines that differ marked
`# UEGR`. Everything else is the plain loop. It runs as is on one process, under DDP and under DeepSpeed ZeRO:

    python examples/accelerate_loop.py --model MODEL_DIR --train-file train.jsonl --validation-file dev.jsonl
    accelerate launch --config_file configs/accelerate/multi-gpu-zero2.yaml examples/accelerate_loop.py ...
    # without GPUs: --cpu for DDP (cpu-2proc-ddp.yaml), --backend gloo for DeepSpeed (cpu-2proc-zero2.yaml)

Files: one JSON object per line with "text" and "label" (a class name or an integer id). `--method` takes any
method with a forward stage (uegr, vanilla, rdrop, freelb, smart, hype, asa, childtuning_f); `--method-options` its
config section as JSON, e.g. '{"rng": "keyed", "dropout": {"k": 3}, "mask": {"ratio": 0.2}}'. With the same settings
this loop trains the same model as `uegr-train` (tested to 1e-6: one process, DDP and ZeRO-2).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from datasets import ClassLabel, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import uegr_dist  # UEGR


def get_dataloaders(
    accelerator: Accelerator, args: argparse.Namespace, tokenizer
) -> tuple[DataLoader, DataLoader, int]:
    """Tokenized train / validation loaders (padded per batch, or to --max-length with --pad-to-max-length) and the
    number of classes (string labels get ids in sorted order, integer labels keep theirs)."""
    data = load_dataset("json", data_files={"train": args.train_file, "validation": args.validation_file})
    names = sorted(set(data["train"]["label"]))
    data = data.cast_column("label", ClassLabel(names=[str(name) for name in names]))

    def tokenize_function(examples):
        return tokenizer(examples["text"], truncation=True, max_length=args.max_length)

    with accelerator.main_process_first():
        # UEGR: each row's index keys its random draws (dropout masks, the adversary's start) with rng "keyed"
        data = data.map(lambda batch, index: {"sample_id": index}, with_indices=True, batched=True)
        data = data.map(tokenize_function, batched=True, remove_columns=["text"])
    data = data.rename_column("label", "labels")

    def collate_fn(examples):
        padding = "max_length" if args.pad_to_max_length else "longest"
        return tokenizer.pad(examples, padding=padding, max_length=args.max_length, return_tensors="pt")

    generator = torch.Generator().manual_seed(args.seed)
    train_dataloader = DataLoader(
        data["train"], shuffle=True, collate_fn=collate_fn, batch_size=args.batch_size, generator=generator
    )
    eval_dataloader = DataLoader(data["validation"], shuffle=False, collate_fn=collate_fn, batch_size=64)
    return train_dataloader, eval_dataloader, len(names)


def training_function(args: argparse.Namespace) -> None:
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        kwargs_handlers=[InitProcessGroupKwargs(backend=args.backend)] if args.backend else [],
    )
    if accelerator.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise SystemExit("every process would train on all the data: without GPUs add --cpu (DDP), or --backend gloo")
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_dataloader, eval_dataloader, num_labels = get_dataloaders(accelerator, args, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)

    loss_fn = uegr_dist.RobustLoss(args.method, seed=args.seed, **json.loads(args.method_options))  # UEGR
    optimizer = uegr_dist.SelectiveAdamW(  # UEGR: AdamW whose step() masks, clips, then updates
        uegr_dist.decay_groups(model.named_parameters(), args.weight_decay),
        lr=args.lr,
        mask=loss_fn.gradient_mask(),
        max_grad_norm=args.max_grad_norm,
    )
    # accelerate's convention: the prepared scheduler advances once per process at every optimizer step.
    steps = args.epochs * -(-len(train_dataloader) // (accelerator.num_processes * args.grad_accum))
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * steps) * accelerator.num_processes,
        num_training_steps=steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler, loss_fn = uegr_dist.prepare(  # UEGR
        accelerator, model, optimizer, train_dataloader, eval_dataloader, lr_scheduler, loss_fn
    )

    for epoch in range(args.epochs):
        model.train()
        for batch in train_dataloader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch).loss  # UEGR: the forward stage, instead of model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()  # the backward stage: score, select, clip, update
                lr_scheduler.step()
                optimizer.zero_grad()

        model.eval()
        correct = total = 0
        for batch in eval_dataloader:
            batch.pop("sample_id")  # UEGR: the model does not take it
            with torch.no_grad():
                predictions = model(**batch).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += int((predictions == references).sum())
            total += references.numel()
        accelerator.print(f"epoch {epoch}: accuracy {correct / total:.4f}")

    loss_fn.remove()  # UEGR: the plain model again (dropout modules, attention)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    accelerator.end_training()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder or Hub id (a sequence classifier)")
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--validation-file", required=True)
    parser.add_argument("--output-dir", default="outputs/accelerate-loop")
    parser.add_argument("--method", default="uegr")
    parser.add_argument("--method-options", default="{}", help="the method's config section as JSON")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pad-to-max-length", action="store_true")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--cpu", action="store_true", help="train on CPU (several CPU processes: DDP over gloo)")
    parser.add_argument("--backend", help="process-group backend, e.g. gloo for DeepSpeed on CPU")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    training_function(parse_args(argv))


if __name__ == "__main__":
    main()
