"""The same runs through `uegr-train`'s `train()`, examples/accelerate_loop.py and `RobustTrainer`, one after the other
in one process or under `accelerate launch`.

Run as `python tests/distributed/library_run.py SPEC` with SPEC a JSON file:
{"base": <uegr-train config dict>, "runs": [{"name": NAME, "via": "uegr-train" | "example" | "trainer",
"method": <method section>, "train": <optional overrides of the train section: grad_accum, mixed_precision>}, ...],
"deepspeed": <DeepSpeed JSON path or null>}. Each run trains the base config's
model, data and training settings with its method and saves its model into base.train.output_dir/NAME (what the
tests compare). The runs take one epoch of one global batch per step, over data where each batch is the whole
training set, so every front-end sees the same rows at every step whatever order its sampler draws them in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import shared_group
import torch
from accelerate.state import AcceleratorState, PartialState

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))


def run_uegr_train(base: dict, method: dict, out: Path) -> None:
    from uegr_dist.config import load_config
    from uegr_dist.config.loading import merge
    from uegr_dist.engine.train_loop import train

    raw = merge(base, {"method": method, "train": {"output_dir": str(out)}})
    result = train(load_config(None, raw))
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [entry["loss"] for entry in result.metrics["train_loss"]]
        (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")


def run_example(base: dict, method: dict, out: Path, deepspeed: str | None) -> None:
    import accelerate_loop

    t, d = base["train"], base["data"]
    options = {k: v for k, v in method.items() if k != "name"}
    accelerate_loop.main(
        [
            *("--model", base["model"]["name_or_path"], "--train-file", d["train_file"]),
            *("--validation-file", d["validation_file"], "--output-dir", str(out), "--method", method["name"]),
            *("--method-options", json.dumps(options), "--epochs", str(int(t["epochs"]))),
            *("--batch-size", str(t["batch_size"]), "--lr", str(t["lr"]), "--weight-decay", str(t["weight_decay"])),
            *("--warmup-ratio", str(t["warmup_ratio"]), "--max-grad-norm", str(t["max_grad_norm"])),
            *("--max-length", str(d["max_length"]), "--pad-to-max-length", "--seed", str(t["seed"])),
            *_cpu_flags(deepspeed),
        ]
    )


def _cpu_flags(deepspeed: str | None) -> list[str]:
    """Without GPUs the example needs accelerate's CPU mode for DDP, and the gloo backend for DeepSpeed."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    return ["--backend", "gloo"] if deepspeed else ["--cpu"]


def run_trainer(base: dict, method: dict, out: Path, deepspeed: str | None) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from uegr_dist.data import PaddingCollator
    from uegr_dist.integrations import RobustTrainer

    t, d = base["train"], base["data"]
    cpu = not torch.cuda.is_available()
    if cpu and deepspeed is not None:
        # transformers sets DeepSpeed up without a backend, which gloo needs on CPU (it would see one process):
        # configure the state with gloo first and tell the Trainer to use it.
        PartialState(backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(base["model"]["name_or_path"])
    data = load_dataset("json", data_files={"train": d["train_file"]})["train"]
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=d["max_length"]), batched=True)
    data = data.rename_column("label", "labels").remove_columns(["text"])
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t["batch_size"],
        num_train_epochs=t["epochs"],
        learning_rate=t["lr"],
        gradient_accumulation_steps=t.get("grad_accum", 1),
        bf16=t.get("mixed_precision") == "bf16",
        weight_decay=t["weight_decay"],
        warmup_steps=0,
        lr_scheduler_type="linear",
        max_grad_norm=t["max_grad_norm"],
        seed=t["seed"],
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        deepspeed=deepspeed,
        disable_tqdm=True,
        # On CPU: DDP needs use_cpu (accelerate's multi-CPU mode over gloo); DeepSpeed the state configured above.
        use_cpu=cpu and deepspeed is None,
        accelerator_config={"use_configured_state": cpu and deepspeed is not None},
    )
    trainer = RobustTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(base["model"]["name_or_path"]),
        args=args,
        train_dataset=data,
        data_collator=PaddingCollator(tokenizer, regression=False, max_length=d["max_length"]),
        method=method["name"],
        method_options={k: v for k, v in method.items() if k != "name"},
    )
    trainer.train()
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    shared_group.keep()  # the runs of one launch share one process group
    root = Path(spec["base"]["train"]["output_dir"])
    for run in spec["runs"]:
        AcceleratorState._reset_state(reset_partial_state=False)
        out = root / run["name"]
        base = {**spec["base"], "train": {**spec["base"]["train"], **run.get("train", {})}}
        if run["via"] == "uegr-train":
            run_uegr_train(base, run["method"], out)
        elif run["via"] == "example":
            run_example(base, run["method"], out, spec.get("deepspeed"))
        else:
            run_trainer(base, run["method"], out, spec.get("deepspeed"))
    shared_group.close()


if __name__ == "__main__":
    main()
