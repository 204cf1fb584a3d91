"""What every benchmark script shares: model presets, synthetic data, run configs, timers, memory probes, the
machine/version record and the FLOP formula (docs/design.md §5)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import resource
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Random-init model configurations. Sizes follow the public checkpoints' config.json (hidden, layers, heads, FFN,
# vocabulary); weights are random, so only speed and memory are meaningful.
_DEBERTA_V3 = {
    "relative_attention": True,
    "position_buckets": 256,
    "pos_att_type": ["p2c", "c2p"],
    "max_relative_positions": -1,
    "position_biased_input": False,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "type_vocab_size": 0,
    "max_position_embeddings": 512,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "architecture": "roberta",
        "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
        "vocab": 8192,
    },
    "small": {
        "architecture": "roberta",
        "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
        "vocab": 8192,
    },
    "roberta-base": {
        "architecture": "roberta",
        "config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        "vocab": 50265,
    },
    "deberta-v3-base": {
        "architecture": "deberta-v2",
        "config": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            **_DEBERTA_V3,
        },
        "vocab": 128100,
    },
    "roberta-large": {
        "architecture": "roberta",
        "config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        "vocab": 50265,
    },
    "deberta-v3-large": {
        "architecture": "deberta-v2",
        "config": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            **_DEBERTA_V3,
        },
        "vocab": 128100,
    },
}


def random_classifier(architecture: str, config: dict[str, Any], num_labels: int = 2, seed: int = 0) -> Any:
    """A random-init sequence classifier, `AutoConfig.for_model(architecture, **config)`, in train mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model_config = AutoConfig.for_model(architecture, num_labels=num_labels, **config)
    return AutoModelForSequenceClassification.from_config(model_config).train()


def model_section(preset: str, seq: int, vocab: int | None = None) -> dict[str, Any]:
    """The `model:` section of a run config for a random-init preset (word-level tokenizer on the synthetic text)."""
    if preset not in PRESETS:
        raise ValueError(f"model preset {preset!r} is unknown; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    config = dict(spec["config"], vocab_size=vocab or spec["vocab"])
    if spec["architecture"] == "roberta":
        # RoBERTa positions start after the padding index: 2 more slots than tokens.
        config.update(max_position_embeddings=max(514, seq + 2), type_vocab_size=1)
    else:
        config.setdefault("max_position_embeddings", max(512, seq))
    return {"init": "random", "architecture": spec["architecture"], "config": config, "tokenizer": "word_level"}


def write_synthetic_task(root: Path, samples: int, words: int, seq: int, eval_samples: int = 4) -> dict[str, Path]:
    """train.jsonl / val.jsonl of binary-labelled texts of `seq` + 16 random words (every batch truncates to `seq`
    tokens, so every step sees the same shape)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(words)]
    paths = {}
    for name, n in (("train", samples), ("val", eval_samples)):
        path = root / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                text = " ".join(rng.choice(vocab) for _ in range(seq + 16))
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
        paths[name] = path
    return paths


def run_config(
    root: Path,
    preset: str,
    method: dict[str, Any],
    *,
    seq: int,
    batch_size: int,
    steps: int,
    vocab: int | None = None,
    mixed_precision: str = "no",
    seed: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """A complete run config (nested dict) of `steps` optimizer steps on a synthetic task written under `root`.

    Constant learning rate without warm-up, clipping at 1.0, no evaluation between epochs, no saving or tracking:
    the loop does per step what a real run does, and nothing else.
    """
    root.mkdir(parents=True, exist_ok=True)
    files = write_synthetic_task(root, samples=steps * batch_size * world + 8, words=3000, seq=seq)
    return {
        "model": model_section(preset, seq, vocab),
        "data": {
            "train_file": str(files["train"]),
            "validation_file": str(files["val"]),
            "max_length": seq,
            "padding": "max_length",
            "max_eval_samples": 4,
        },
        "train": {
            "output_dir": str(root / "out"),
            "max_steps": steps,
            "batch_size": batch_size,
            "eval_batch_size": 4,
            "lr": 2e-5,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "mixed_precision": mixed_precision,
            "tracker": "none",
            "progress": False,
            "save_model": False,
            "eval_every_epoch": False,
            "log_every": 1000,
            "overwrite": True,
            "seed": seed,
        },
        "method": method,
    }


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (timers must not stop while kernels still run); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wall-clock seconds per named stage of the current step, measured between synchronized points.

    `with timer("backward"): ...` adds the block's duration to the stage; `start_step()` begins a new record.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.starts: list[float] = []

    def start_step(self) -> None:
        """Mark the start of an iteration (the step time is the interval between two consecutive starts)."""
        synchronize(self.device)
        self.starts.append(time.perf_counter())
        self.steps.append({})

    def add(self, stage: str, seconds: float) -> None:
        """Add seconds to a stage of the current step (ignored before the first step)."""
        if self.steps:
            self.steps[-1][stage] = self.steps[-1].get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        tic = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.add(stage, time.perf_counter() - tic)

    def step_records(self, warmup: int) -> list[dict[str, float]]:
        """Per measured step: {"step": seconds, stage: seconds, ...}; steps before `warmup` and the last (unfinished)
        one are left out."""
        records = []
        for i in range(warmup, len(self.starts) - 1):
            records.append({"step": self.starts[i + 1] - self.starts[i], **self.steps[i]})
        return records


def median_records(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median of every key over the records (a stage missing from a record counts as 0 there)."""
    keys = sorted({key for record in records for key in record})
    return {key: statistics.median(record.get(key, 0.0) for record in records) for key in keys}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: on CUDA the allocator's peak (`max_memory_allocated`); on CPU the peak resident set
    size sampled every `interval` s by a thread, minus the RSS when the block started (what the block added)."""

    def __init__(self, device: torch.device | str, interval: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.base_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_bytes = torch.cuda.memory_allocated()
            return self
        self.base_bytes = self.peak_bytes = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    @property
    def added_bytes(self) -> int:
        """Peak minus the value at the start of the block."""
        return self.peak_bytes - self.base_bytes


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, load and library versions, recorded next to every result."""
    import accelerate
    import transformers

    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except Exception:  # DeepSpeed is optional for single-process runs; its import can fail on odd machines
        deepspeed_version = None
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "deepspeed": deepspeed_version,
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def model_shape(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts (all, and without the embedding tables) and the transformer's layers and width."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {
        "params": total,
        "non_embedding_params": total - embedding,
        "layers": int(config.num_hidden_layers),
        "hidden": int(config.hidden_size),
    }


def flops_per_token(shape: dict[str, int], seq: int, backward: bool = True) -> float:
    """Model FLOPs per token (docs/design.md §5): forward + backward 6 N + 12 L d S, forward only 2 N + 4 L d S, with N
    the parameters outside the embedding tables (a lookup multiplies nothing), L layers, d width, S sequence length."""
    n, layers, hidden = shape["non_embedding_params"], shape["layers"], shape["hidden"]
    if backward:
        return 6.0 * n + 12.0 * layers * hidden * seq
    return 2.0 * n + 4.0 * layers * hidden * seq


def module_at_revision(revision: str, path: str, name: str) -> Any:
    """The Python module at `path` (relative to the repository root) as it was at git `revision`, imported under
    `name` (its own imports resolve to the working tree's package): a "before" variant measured side by side with
    the working tree's code in one process."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"{revision}:{path}"
    sys.modules[name] = module  # dataclasses look their module up while the source runs
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
