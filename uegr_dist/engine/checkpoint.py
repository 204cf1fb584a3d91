"""Checkpoints of a training run: atomic writes, the newest complete one on `--resume auto`, and exact resume.

A checkpoint is `output_dir/checkpoints/step-N/`:

- what `accelerator.save_state` writes: the model as safetensors, the optimizer and scheduler (or the DeepSpeed
  engine's per-rank ZeRO shards) and every rank's RNG states (python, numpy, torch, CUDA);
- `method_state_<rank>.pt`: what the method carries (dropout-rate controller, ...), what the optimizer's gradient
  mask carries (its step count and saliency EMA: per process under ZeRO) and, with `train.average`, the weight
  average (per process under ZeRO: this process's partitions);
- `loop_state.pt`: the loop's position (step, micro-step, epoch, batches consumed in the epoch, the shuffle
  generator's state at the start of the epoch), its logs and counters;
- `checkpoint.json`, written last: step, the run identity (model, data, method sections, the train keys that fix the
  data order, the process count) and every file's size and sha256.

Everything is written into `checkpoints/.tmp-step-N` and renamed to `step-N` once the manifest is on disk, so a
killed writer leaves a `.tmp-` directory, never a `step-N` that looks complete. Non-weight state is read with
`torch.load(weights_only=True)` (accelerate does the same for its files); DeepSpeed reads its own shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from uegr_dist.backward import SelectiveAdamW
from uegr_dist.config import Config, config_to_dict
from uegr_dist.methods import Method

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
LOOP_STATE = "loop_state.pt"
FORMAT_VERSION = 2
"""2: the method state file holds the method's and the gradient mask's state (1: the method's, mask included)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Train keys that fix which samples a step sees: a checkpoint cannot continue under other values.
_DATA_ORDER_KEYS = ("seed", "batch_size", "grad_accum")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or belongs to another run; the message names it and why."""


def method_state_file(rank: int) -> str:
    """File name of one rank's method state inside a checkpoint."""
    return f"method_state_{rank}.pt"


@dataclass
class LoopState:
    """Where the loop is and what it has logged: everything besides model, optimizer, scheduler, RNG and method."""

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Batches of `epoch` this process has consumed (skipped with `skip_first_batches` on resume)."""
    epoch_generator_state: list[int] | None = None
    """The shuffle generator's state (bytes as ints) at the start of `epoch`: the epoch's order is redrawn from it."""
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    window_loss: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    nonfinite_steps: int = 0
    """Optimizer steps skipped because the loss or a gradient was not finite (on any process)."""
    nonfinite_in_a_row: int = 0


def run_identity(cfg: Config, num_processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: model, data and method sections, the data-order
    keys of train (and train.average when it averages), and the process count (ZeRO shards and per-process data
    positions depend on it)."""
    full = config_to_dict(cfg)
    train = {key: full["train"][key] for key in _DATA_ORDER_KEYS}
    if full["train"]["average"]["kind"] != "none":  # the average is part of the state (absent: as before)
        train["average"] = full["train"]["average"]
    return {
        "model": full["model"],
        "data": full["data"],
        "method": full["method"],
        "train": train,
        "num_processes": num_processes,
    }


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a run identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out.extend(_differences(saved.get(key), current.get(key), f"{prefix}{key}."))
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')} = {current!r} (checkpoint: {saved!r})"]


def _fill_defaults(saved: Any, defaults: Any, filled: list[str], prefix: str = "") -> Any:
    """`saved` with every key of `defaults` it lacks added at its default value (nested dicts); the dotted names of
    the added keys are appended to `filled`."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
            filled.append(f"{prefix}{key}")
        else:
            out[key] = _fill_defaults(out[key], value, filled, f"{prefix}{key}.")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and sha256 of every file under `directory` except the manifest."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            table[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return table


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint directory; CheckpointError naming the problem otherwise."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST} (incomplete: the writer was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({err})") from err
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION} (written by another "
            "version of uegr-dist, which stores the method state differently: resume it with that version)"
        )
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {rel} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: file {rel} has {size} bytes, expected {expected['size']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {rel} is corrupted (sha256 mismatch)")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def check_identity(manifest: dict[str, Any], path: Path, identity: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with another model, data, method, data order or process count.

    A checkpoint written before a config option existed resumes when that option is at its default (a new option's
    default keeps the behaviour from before it), e.g. an UEGR run cut off before the flatness methods' sections were
    added; the filled-in options are logged."""
    if manifest.get("fingerprint") == fingerprint(identity):
        return
    saved = manifest.get("identity", {})
    filled: list[str] = []
    completed = _fill_defaults(saved, run_identity(Config(), identity["num_processes"]), filled)
    if filled and fingerprint(completed) == fingerprint(identity):
        logger.warning("checkpoint %s predates options %s; resuming with their defaults", path, ", ".join(filled))
        return
    diffs = _differences(saved, identity)
    raise CheckpointError(
        f"checkpoint {path} belongs to another run configuration; it differs in: {'; '.join(diffs[:6])}"
        + (f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else "")
        + ". Resume with the same config, or start a new run in another train.output_dir"
    )


def select_resume_checkpoint(cfg: Config, num_processes: int) -> Path | None:
    """The checkpoint `train.resume` asks for: None for `none` (or `auto` with no complete checkpoint); for `auto`
    the newest complete one, skipping incomplete or corrupted ones with a warning naming each; a PATH must be a
    complete checkpoint. A checkpoint of another run configuration is refused (CheckpointError), never skipped.
    Only reads: nothing on disk changes. Every process calls it (same answer on a shared file system)."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    identity = run_identity(cfg, num_processes)
    if resume != "auto":
        path = Path(resume)
        try:
            manifest = validate_checkpoint(path)
        except CheckpointError as err:
            hint = "" if path.is_dir() else " (train.resume is none, auto, or a checkpoint directory)"
            raise CheckpointError(f"train.resume = {resume!r}: {err}{hint}") from err
        check_identity(manifest, path, identity)
        return path
    root = Path(cfg.train.output_dir) / CHECKPOINTS
    for _, path in list_checkpoints(root):
        try:
            manifest = validate_checkpoint(path)
        except CheckpointError as err:
            logger.warning("resume auto: skipping %s", err)
            continue
        check_identity(manifest, path, identity)
        return path
    return None


def _rng_snapshot() -> dict[str, Any]:
    """The process's global RNG states (python, numpy, torch CPU and CUDA)."""
    snap = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def _rng_restore(snap: dict[str, Any]) -> None:
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap:
        torch.cuda.set_rng_state_all(snap["cuda"])


class Checkpointer:
    """Saves and restores the whole run state; the loop calls `resume` once, `epoch_batches` per epoch,
    `due` at every optimizer-step boundary (then `save`) and `save` at the end or on preemption."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: Config,
        method: Method,
        optimizer: SelectiveAdamW,
        generator: torch.Generator,
        resume: Path | None,
        averager: Any = None,
    ) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.method = method
        self.optimizer = optimizer
        self.generator = generator
        self.averager = averager
        self.root = Path(cfg.train.output_dir) / CHECKPOINTS
        self.identity = run_identity(cfg, accelerator.num_processes)
        self.resume_from = resume
        self.last_saved_step: int | None = None
        # Global RNG states to put back once the resumed epoch's first batch is fetched (see epoch_batches).
        self._pending_rng: dict[str, Any] | None = None

    def resume(self) -> LoopState:
        """Load the selected checkpoint into model, optimizer (and its mask), scheduler, method and RNG; the loop state
        to go on from (a fresh one when there is nothing to resume). Call after `prepare` and `method.setup`."""
        if self.resume_from is None:
            if self.accelerator.is_main_process:
                self._clear_for_fresh_start()
            self.accelerator.wait_for_everyone()
            return LoopState()
        path = self.resume_from  # validated and identity-checked by select_resume_checkpoint
        rank = self.accelerator.process_index
        self.accelerator.load_state(str(path))
        self._pending_rng = _rng_snapshot()
        method_file = path / method_state_file(rank)
        saved = torch.load(method_file, map_location="cpu", weights_only=True)
        self.method.load_state_dict(saved["method"])
        self.optimizer.load_mask_state_dict(saved["mask"])
        if self.averager is not None:
            self.averager.load_state_dict(saved.get("average"))
        loop = LoopState(**torch.load(path / LOOP_STATE, map_location="cpu", weights_only=True))
        self.last_saved_step = loop.step
        if self.accelerator.is_main_process:
            self._set_aside_newer(loop.step)
            print(f"resuming from {path} (step {loop.step})", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        return loop

    def _clear_for_fresh_start(self) -> None:
        """A fresh start must not leave older checkpoints that a later `--resume auto` would take for its own:
        with train.overwrite the overwritten run's checkpoints are deleted; under `auto` (none usable) they are set
        aside. (A fresh start without either is refused before anything runs: `refuse_stale_checkpoints`.)"""
        if self.cfg.train.resume == "none" and self.cfg.train.overwrite:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self._set_aside_newer(-1)

    def _set_aside_newer(self, step: int) -> None:
        """Rename checkpoints newer than the one resumed (incomplete or corrupted) to `step-N.invalid`: the run will
        write those steps again, and nothing a user has is overwritten or deleted."""
        for other_step, path in list_checkpoints(self.root):
            if other_step > step:
                target = path.with_name(f"{path.name}.invalid")
                n = 1
                while target.exists():
                    target = path.with_name(f"{path.name}.invalid{n}")
                    n += 1
                path.rename(target)
                logger.warning("checkpoint %s is not usable: kept as %s", path, target)

    def epoch_batches(self, loader: Any, state: LoopState) -> Any:
        """Iterate `loader` for epoch `state.epoch`: a fresh epoch records the shuffle generator's state; the epoch a
        run resumes in redraws the same order from the saved state and skips the batches already consumed.

        The global RNG states are put back after the resumed iterator is made (making it draws from the global
        generator): the first batch then meets exactly the RNG state the interrupted run had at that point."""
        if self._pending_rng is None:
            state.epoch_generator_state = self.generator.get_state().tolist()
            state.batches_in_epoch = 0
            batches = loader
        else:
            if state.epoch_generator_state is not None:
                self.generator.set_state(torch.tensor(state.epoch_generator_state, dtype=torch.uint8))
            batches = self.accelerator.skip_first_batches(loader, state.batches_in_epoch)
        if hasattr(batches, "set_epoch"):  # an epoch-seeded sampler (data.group_by_length) draws this epoch's order
            batches.set_epoch(state.epoch)
        for batch in batches:
            if self._pending_rng is not None:
                _rng_restore(self._pending_rng)
                self._pending_rng = None
            state.batches_in_epoch += 1
            yield batch
        if self._pending_rng is not None:
            _rng_restore(self._pending_rng)
            self._pending_rng = None

    def due(self, state: LoopState, total_steps: int) -> bool:
        """Whether a checkpoint is due after this step: every `train.save_every` steps (the end of the run is saved by
        the loop after the final eval)."""
        every = self.cfg.train.save_every
        return every > 0 and state.step % every == 0 and state.step < total_steps

    def save(self, state: LoopState) -> Path:
        """Write checkpoint `step-N` atomically (all ranks write into `.tmp-step-N`; rank 0 adds the manifest and
        renames after a barrier), then keep the last `train.keep_last`. Every process must call it."""
        acc = self.accelerator
        final = self.root / f"step-{state.step}"
        tmp = self.root / f".tmp-step-{state.step}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # the leftover of a writer that was killed: never a complete checkpoint
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        state_file = tmp / method_state_file(acc.process_index)
        saved = {"method": self.method.state_dict(), "mask": self.optimizer.mask_state_dict()}
        average = None if self.averager is None else self.averager.state_dict()
        if average is not None:  # train.average: this process's average (nothing without averaging)
            saved["average"] = average
        torch.save(saved, state_file)
        if acc.is_main_process:
            torch.save(asdict(state), tmp / LOOP_STATE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            manifest = {
                "format": FORMAT_VERSION,
                "step": state.step,
                "epoch": state.epoch,
                "fingerprint": fingerprint(self.identity),
                "identity": self.identity,
                "files": _file_table(tmp),
            }
            with (tmp / MANIFEST).open("w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            replaced = None
            if final.exists():  # only with train.overwrite: an earlier run's checkpoint at the same step
                replaced = final.with_name(f".old-{final.name}")
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
            tmp.rename(final)
            _fsync_dir(self.root)
            if replaced is not None:
                shutil.rmtree(replaced)
            self._prune()
        acc.wait_for_everyone()
        self.last_saved_step = state.step
        return final

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest `train.keep_last` (incomplete ones are left alone)."""
        complete = [path for _, path in list_checkpoints(self.root) if (path / MANIFEST).is_file()]
        for path in complete[self.cfg.train.keep_last :]:
            shutil.rmtree(path)


def refuse_stale_checkpoints(cfg: Config) -> None:
    """A fresh start (train.resume none) must not write over the checkpoints of an earlier run unless asked to."""
    from uegr_dist.config import ConfigError

    if cfg.train.resume != "none" or cfg.train.overwrite:
        return
    existing = list_checkpoints(Path(cfg.train.output_dir) / CHECKPOINTS)
    if existing:
        raise ConfigError(
            f"train.output_dir = {cfg.train.output_dir!r} holds checkpoints of an earlier run "
            f"(newest: {existing[0][1].name}); continue it with --resume auto, or start over with "
            "--train.overwrite true"
        )
