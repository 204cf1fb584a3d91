"""Shared fixtures: an easy synthetic classification task written to disk and tiny random-init model configs."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TINY_MODELS = {
    "bert": {**TINY, "max_position_embeddings": 64},
    "roberta": {**TINY, "max_position_embeddings": 66, "type_vocab_size": 1},
    "deberta-v2": {
        **TINY,
        "max_position_embeddings": 64,
        "relative_attention": True,
        "position_buckets": 16,
        "pos_att_type": ["p2c", "c2p"],
        "type_vocab_size": 0,
    },
}
POSITIVE_WORDS = [f"p{i}" for i in range(20)]
NEGATIVE_WORDS = [f"n{i}" for i in range(20)]


def tiny_dropout_free_model(arch: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A random 3-class classifier (vocabulary 60, pad id 0) with dropout off, in train mode: what parity tests
    compare against references that cannot reproduce dropout masks."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=60,
        num_labels=3,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **TINY_MODELS[arch],
    )
    return AutoModelForSequenceClassification.from_config(cfg).train()


def method_context(model, optimizer=None, *, seed: int = 0, named=None, data=None, num_processes: int = 1):
    """The MethodContext of a one-process run of `model` (no wrapper): trainable parameters in model order (or
    `named`), a local backend whose update runs in `optimizer` (a SelectiveAdamW for methods with a before-update
    hook, SAM). num_processes > 1: a backend that reports that many processes (for maths that divides by it; it
    must not be asked to reduce)."""
    from uegr_dist.engine.backend import LocalBackend
    from uegr_dist.methods import MethodContext

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if named is None else named
    backend = LocalBackend(num_processes, 0, torch.device("cpu"), optimizer)
    return MethodContext(model, model, named, backend, seed, data)


def zero3_backend():
    """A backend that reports DeepSpeed ZeRO-3 (parameters partitioned), for start-up refusals."""
    from uegr_dist.engine.backend import Backend

    class Zero3Backend(Backend):
        zero_stage = 3
        steps_in_backward = True

    return Zero3Backend(1, 0, torch.device("cpu"))


def write_easy_task(path: Path, n: int, seed: int) -> Path:
    """JSONL rows labelled 'pos' / 'neg' whose words come 80% from the label's own word list (learnable in a few
    dozen steps by a tiny random model)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        positive = rng.random() < 0.5
        own, other = (POSITIVE_WORDS, NEGATIVE_WORDS) if positive else (NEGATIVE_WORDS, POSITIVE_WORDS)
        words = [rng.choice(own if rng.random() < 0.8 else other) for _ in range(rng.randint(4, 12))]
        lines.append(json.dumps({"text": " ".join(words), "label": "pos" if positive else "neg"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls run faster on one thread than split over two (and do not fight parallel test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def easy_task(tmp_path_factory) -> dict[str, Path]:
    """Train / validation files of the easy cue-word task."""
    root = tmp_path_factory.mktemp("easy_task")
    return {
        "train": write_easy_task(root / "train.jsonl", 256, seed=0),
        "validation": write_easy_task(root / "validation.jsonl", 64, seed=1),
    }


def tiny_run_overrides(arch: str, task: dict[str, Path], out: Path, **extra: object) -> dict:
    """A complete config (as a nested dict) for a few steps of a tiny random model on the easy task."""
    cfg = {
        "model": {"init": "random", "architecture": arch, "config": dict(TINY_MODELS[arch]), "tokenizer": "word_level"},
        "data": {"train_file": str(task["train"]), "validation_file": str(task["validation"]), "max_length": 24},
        "train": {
            "output_dir": str(out),
            "epochs": 4,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "log_every": 4,
            "tracker": "none",
            "progress": False,
            "seed": 0,
        },
        # A tiny random model's token embeddings have norm ~0.1, so the adversary's budget is scaled down with them.
        "method": {"name": "uegr", "adversary": {"eps": 0.01, "step_size": 0.01}},
    }
    for dotted, value in extra.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def train_victim(root: Path, arch: str = "bert", method: str = "uegr", epochs: int = 4) -> Path:
    """A tiny model trained by the real `train()` on the easy cue-word task; returns its output directory."""
    from uegr_dist.config import load_config
    from uegr_dist.engine.train_loop import train

    task = {
        "train": write_easy_task(root / "train.jsonl", 256, seed=0),
        "validation": write_easy_task(root / "validation.jsonl", 64, seed=1),
    }
    out = root / f"{arch}-{method}"
    cfg = tiny_run_overrides(arch, task, out, method__name=method, train__epochs=epochs)
    assert train(load_config(None, cfg)).metrics["final"]["accuracy"] >= 0.75
    return out


@pytest.fixture(scope="session")
def victim_dir(tmp_path_factory) -> Path:
    """The tiny UEGR-trained victim of the robustness tests, trained once per test session (read-only for tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_victim(tmp_path_factory.mktemp("victim"))
    finally:
        torch.set_num_threads(threads)


def method_preset(name: str, easy_task: dict[str, Path], out: Path, method: dict | None = None, **train: object):
    """configs/methods/<name>.yaml with the tiny model and task swapped in; its method section untouched, or with
    `method` merged over it; `train` updates the train section."""
    from uegr_dist.config import load_config

    tiny_cfg = tiny_run_overrides("bert", easy_task, out)
    tiny_cfg.pop("method")
    if method is not None:
        tiny_cfg["method"] = method
    tiny_cfg["train"].update(train)
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "methods" / f"{name}.yaml", tiny_cfg)


def run_reaped(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout)` that, on timeout, also kills every
    process the command started. `accelerate launch` starts its ranks in sessions of their own (torch elastic), so
    killing the launcher alone (what `subprocess.run` does) leaves them running: on a 2-core machine such orphans
    slow every later test."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        proc.kill()
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something outside the family still holds the pipes
            out, err = "", ""
        raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_in_threads(world: int, barrier: threading.Barrier, fn: Callable[[int], object]) -> list:
    """fn(rank) for rank in range(world), each in its own thread (lockstep shards that meet at `barrier`); the
    results in rank order. The first error is raised here, after aborting the barrier so no thread waits forever."""
    results: list = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as error:  # surfaced in the calling thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
