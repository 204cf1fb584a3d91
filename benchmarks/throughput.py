"""Training throughput of every method through our loop, against a plain Accelerate loop and the naive UEGR.

    python -m benchmarks.throughput                                   # the default CPU run (tiny, roberta-base)
    python -m benchmarks.throughput --configs roberta-large deberta-v3-large --device cuda --dtype bf16 \\
        --batch 16 --seq 128 --tag gpu                                 # on one GPU

For every model preset x K x sequence length x batch size, each variant trains a short run of `--warmup` + `--steps`
optimizer steps on the same synthetic data, `--rounds` times, the variants interleaved within each round (machine
noise hits them alike). Variants:

- `plain-accelerate`: vanilla fine-tuning written as accelerate's NLP example (forward, `accelerator.backward`,
  clip, AdamW, scheduler), the floor for what our loop costs;
- `floor` (with `--floor`): the least a vanilla step can do: forward, backward, a fused AdamW step (`fused=True`),
  `zero_grad(set_to_none=True)`; no clipping, no scheduler, no accelerate wrapper around the optimizer;
- every name in `--methods` (default vanilla, uegr; any method of `uegr_dist.config.registry` joins by name):
  the real `uegr_dist.engine.train_loop.train()`;
- `naive-uegr` (when uegr is benchmarked): benchmarks/naive_uegr.py, K + 1 sequential forwards, a Python-loop
  mask with a full-gradient torch.topk, a per-tensor AdamW.

Measured per step (medians over the measured steps of all rounds; the first `--warmup` steps of each run left out):
the step time (interval between the starts of two consecutive iterations: data loading and everything the loop does
included), unique samples/s = B / step, tokens/s = B S / step, TFLOP/s (`common.flops_per_token`; UEGR counts
K + 1 forward+backward passes plus T adversary passes of forward + input-only backward at 2/3 of a
forward+backward), peak memory, and the stages, each timed by synchronized wall-clock timers wrapped at run time
around the calls (nothing in the package is edited):

- adversary: UEGR's `_adversarial_delta` (the T ascent passes); naive: its ascent loop;
- forward: the method's `loss` minus the adversary (stacked forward, losses); naive: the K + 1 forwards + losses;
- backward: `accelerator.backward` (the rest of `forward_backward`); under DeepSpeed the engine step runs inside it,
  and the masking and optimizer time measured there are moved to their own stages;
- saliency_mask: the optimizer's mask, `GradientMasker.apply_` (scores, top-k selection, zeroing) inside
  `SelectiveAdamW.step`, or under ZeRO `ZeroGradientMasker.compute_masks` at the ZeRO step's entry;
- optimizer: the rest of `SelectiveAdamW.step` (clipping and the masked AdamW update; under ZeRO the update of each
  partition);
- communication (several processes only; part of the stage it runs in): wall time inside torch.distributed
  collectives called from Python (DeepSpeed's reductions, the masking all-reduces), and under DDP the time from
  issuing each bucket's all-reduce to its completion (a comm hook; this overlaps the backward);
- other: step minus the stages above (data loading, scheduler, zero_grad, logging).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the run; on CPU the peak resident set size sampled every
10 ms minus the RSS when the run started (model, optimizer state, gradients, activations of that run).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import functools
import gc
import itertools
import json
import shlex
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from benchmarks import report
from benchmarks.common import (
    PRESETS,
    PeakMemory,
    StageTimer,
    flops_per_token,
    machine_info,
    median_records,
    model_shape,
    run_config,
    synchronize,
)
from benchmarks.naive_uegr import NaiveUEGR
from uegr_dist.backward import SelectiveAdamW, ZeroGradientMasker
from uegr_dist.config import Config, load_config
from uegr_dist.config.registry import METHOD_NAMES as METHODS
from uegr_dist.data.text_classification import PaddingCollator
from uegr_dist.engine import setup as run_setup
from uegr_dist.engine import train_loop
from uegr_dist.methods import Method, model_inputs
from uegr_dist.modeling import load_model

PLAIN, NAIVE, FLOOR = "plain-accelerate", "naive-uegr", "floor"
STAGES = ("adversary", "forward", "backward", "saliency_mask", "optimizer", "communication", "other")
README = Path(__file__).resolve().parent / "README.md"
_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor", "all_gather")
_COLLECTIVES += ("broadcast", "reduce")


# --- timing our loop -------------------------------------------------------------------------------------------------


def _inner_optimizer(optimizer: Any) -> Any:
    """The optimizer that updates the parameters (through accelerate's and DeepSpeed's wrappers)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _wrap(owner: Any, name: str, timer: StageTimer, stage: str) -> None:
    """Replace owner.name (a bound method) by one that adds its wall time to `stage`."""
    original = getattr(owner, name)

    @functools.wraps(original)  # keeps markers others set on it (the LR scheduler's on optimizer.step)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer(stage):
            return original(*args, **kwargs)

    setattr(owner, name, timed)


class _TimedWork:
    """An async collective's work handle whose `wait` adds its wall time to the communication stage."""

    def __init__(self, work: Any, timer: StageTimer) -> None:
        self._work, self._timer = work, timer

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        tic = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.add("communication", time.perf_counter() - tic)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _time_collectives(timer: StageTimer) -> Callable[[], None]:
    """Time every torch.distributed collective called from Python; returns the function that undoes it."""
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def timed(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            work = original(*args, **kwargs)
            timer.add("communication", time.perf_counter() - tic)
            return _TimedWork(work, timer) if work is not None and hasattr(work, "wait") else work

        return call

    for name, original in saved.items():
        setattr(dist, name, timed(original))

    def undo() -> None:
        for name, original in saved.items():
            setattr(dist, name, original)

    return undo


def _time_ddp_allreduce(model: Any, timer: StageTimer) -> None:
    """DDP comm hook: the average all-reduce of each bucket, timed from issue to completion."""

    # No annotations: DDP checks them against dist.GradBucket, and this module's are strings (postponed).
    def hook(state, bucket):
        tic = time.perf_counter()
        tensor = bucket.buffer().div_(dist.get_world_size())
        future = dist.all_reduce(tensor, async_op=True).get_future()

        def done(fut):
            timer.add("communication", time.perf_counter() - tic)
            return fut.value()[0]

        return future.then(done)

    model.register_comm_hook(None, hook)


def _instrument(method: Method, timer: StageTimer, device: str) -> None:
    """Time the stages of `method` inside the real loop (instance attributes: the class is left alone)."""
    original_forward_backward, original_setup = method.forward_backward, method.setup
    _wrap(method, "loss", timer, "objective")
    if hasattr(method, "_adversarial_delta"):
        _wrap(method, "_adversarial_delta", timer, "adversary")

    def setup(ctx: Any) -> None:
        original_setup(ctx)
        if isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel):
            _time_ddp_allreduce(ctx.model, timer)

    def forward_backward(*args: Any, **kwargs: Any) -> Any:
        timer.start_step()
        record = timer.steps[-1]
        tic = time.perf_counter()
        result = original_forward_backward(*args, **kwargs)
        synchronize(device)
        # What ran inside accelerator.backward besides the backward itself (the DeepSpeed step) has its own stage.
        inside = record.get("saliency_mask", 0.0) + record.get("optimizer", 0.0)
        record["backward"] = time.perf_counter() - tic - record.get("objective", 0.0) - inside
        return result

    method.setup = setup  # type: ignore[method-assign]
    method.forward_backward = forward_backward  # type: ignore[method-assign]


def _instrument_optimizer(optimizer: SelectiveAdamW, timer: StageTimer, device: str) -> None:
    """Time the backward stage run by the optimizer: the mask (`GradientMasker.apply_`, or under ZeRO
    `ZeroGradientMasker.compute_masks`) as saliency_mask, the rest of `SelectiveAdamW.step` (clipping, the AdamW
    update; under ZeRO the update of each partition) as optimizer."""
    original_attach, original_step = optimizer.attach, optimizer.step

    def attach(backend: Any) -> None:
        original_attach(backend)
        if isinstance(optimizer.masker, ZeroGradientMasker):
            _wrap(optimizer.masker, "compute_masks", timer, "saliency_mask")
        elif optimizer.masker is not None:
            _wrap(optimizer.masker, "apply_", timer, "saliency_mask")

    def step(self: SelectiveAdamW, *args: Any, **kwargs: Any) -> Any:
        masked_before = timer.steps[-1].get("saliency_mask", 0.0) if timer.steps else 0.0
        synchronize(device)
        tic = time.perf_counter()
        result = original_step(*args, **kwargs)
        synchronize(device)
        masked = (timer.steps[-1].get("saliency_mask", 0.0) if timer.steps else 0.0) - masked_before
        timer.add("optimizer", time.perf_counter() - tic - masked)
        return result

    optimizer.attach = attach  # type: ignore[method-assign]
    # A bound method: the LR scheduler built next wraps optimizer.step through its __func__.
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]


def instrumented_train(cfg: Config, timer: StageTimer, device: str = "cpu") -> dict[str, Any]:
    """Run `train_loop.train(cfg)` with the method's and the optimizer's stages timed into `timer`; returns the
    run's metrics."""
    original_build, original_optimizer = run_setup.build_method, run_setup.build_optimizer

    def build(method_cfg: Any) -> Method:
        method = original_build(method_cfg)
        _instrument(method, timer, device)
        return method

    def build_optimizer(*args: Any, **kwargs: Any) -> SelectiveAdamW:
        optimizer = original_optimizer(*args, **kwargs)
        _instrument_optimizer(optimizer, timer, device)
        return optimizer

    run_setup.build_method, run_setup.build_optimizer = build, build_optimizer
    undo = _time_collectives(timer) if dist.is_available() else (lambda: None)
    try:
        return train_loop.train(cfg).metrics
    finally:
        undo()
        run_setup.build_method, run_setup.build_optimizer = original_build, original_optimizer


def stage_breakdown(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median step and stages over the records; forward = objective - adversary, other = step - the stages."""
    rows = []
    for record in records:
        row = dict(record)
        if "objective" in row:  # our loop and plain-accelerate time the whole objective, adversary included
            row["forward"] = row.pop("objective") - row.get("adversary", 0.0)
        row["other"] = row["step"] - sum(row.get(s, 0.0) for s in STAGES if s not in ("communication", "other"))
        rows.append(row)
    median = median_records(rows)
    return {stage: median.get(stage, 0.0) for stage in ("step", *STAGES)}


# --- the reference loops ---------------------------------------------------------------------------------------------


def _task_and_model(cfg: Config) -> tuple[Any, Any, DataLoader]:
    """The tokenizer, model and training loader `train()` would build for this config (same data and weights)."""
    tokenizer, task = run_setup.load_task(cfg)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, cfg.train.seed)
    collate = PaddingCollator(tokenizer, task.regression, max_length=cfg.data.max_length)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(
        task.train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate, generator=generator
    )
    return tokenizer, model, loader


def plain_accelerate_run(cfg: Config, timer: StageTimer, device: str) -> dict[str, int]:
    """Vanilla fine-tuning as accelerate's NLP example writes it: the floor for our loop's own overhead. Returns
    the model's `model_shape`."""
    _, model, loader = _task_and_model(cfg)
    shape = model_shape(model)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=0, num_training_steps=1_000_000)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    _wrap(_inner_optimizer(optimizer), "step", timer, "optimizer")
    model.train()
    for step, batch in enumerate(loader):
        if step == cfg.train.max_steps - 1:
            break  # the loop's last iteration only marks the end of the one before (see the final start_step)
        timer.start_step()
        with timer("objective"):
            outputs = model(**model_inputs(batch), labels=batch["labels"])
        with timer("backward"):
            accelerator.backward(outputs.loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    timer.start_step()
    accelerator.end_training()
    return shape


def floor_run(cfg: Config, timer: StageTimer, device: str) -> None:
    """The least a vanilla step does: forward, backward, fused AdamW, zero_grad (no clipping, no scheduler)."""
    _, model, loader = _task_and_model(cfg)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    model, loader = accelerator.prepare(model, loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    _wrap(optimizer, "step", timer, "optimizer")
    model.train()
    for step, batch in enumerate(loader):
        if step == cfg.train.max_steps - 1:
            break  # the loop's last iteration only marks the end of the one before (see the final start_step)
        timer.start_step()
        with timer("objective"), accelerator.autocast():
            loss = F.cross_entropy(model(**model_inputs(batch)).logits.float(), batch["labels"])
        with timer("backward"):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timer.start_step()
    accelerator.end_training()


def naive_uegr_run(cfg: Config, timer: StageTimer, device: str) -> None:
    """The naive reference UEGR (benchmarks/naive_uegr.py) on the same data and weights."""
    _, model, loader = _task_and_model(cfg)
    model.to(device).train()
    naive = NaiveUEGR(
        model,
        cfg.method,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        timer=timer,
    )
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"
    )
    for step, batch in enumerate(loader):
        if step == cfg.train.max_steps - 1:
            break  # the loop's last iteration only marks the end of the one before (see the final start_step)
        batch = {k: v.to(device) for k, v in batch.items()}
        timer.start_step()
        with autocast:
            naive.step(batch, step)
    timer.start_step()


# --- one measurement -------------------------------------------------------------------------------------------------


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (so the next run's RSS peak is its own)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed at 128 KiB: large tensors live in their own mappings
        libc.malloc_trim(0)
    except OSError:  # not glibc: the CPU peak then also counts memory an earlier run left in the heap
        pass


def step_flops(variant: str, shape: dict[str, int], k: int, adversary_steps: int, batch: int, seq: int) -> float | None:
    """Model FLOPs of one optimizer step (None for a method whose passes this benchmark does not know)."""
    per_pass = batch * seq * flops_per_token(shape, seq)
    if variant in (PLAIN, "vanilla", FLOOR):
        return per_pass
    if variant in ("uegr", NAIVE):
        # The adversary runs a forward (1/3) and an input-only backward (another 1/3, no weight gradients).
        return (k + 1) * per_pass + adversary_steps * per_pass * 2.0 / 3.0
    return None


PROFILES: list[str] = []
"""`--profile`: one operator table per variant and grid point, written to profile_<tag>.txt."""


@contextlib.contextmanager
def _profiler(enabled: bool, device: str) -> Iterator[Any]:
    """torch.profiler around one run (CPU and, on CUDA, kernel times), or nothing."""
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield profiler


def _profile_table(profiler: Any, title: str, steps: int, args: argparse.Namespace) -> str:
    """The run's operators by self device time (CPU time on CPU), top `--profile-rows`; totals cover all `steps`."""
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60)
    return f"## {title} ({steps} optimizer steps, set-up included)\n\n{table}\n"


def measure(
    args: argparse.Namespace, preset: str, k: int, seq: int, batch: int, root: Path, progress: tqdm
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per variant) and ratios for one point of the grid."""
    variants = [FLOOR] * args.floor + [PLAIN, *args.methods]
    variants += [NAIVE] if "uegr" in args.methods and not args.no_naive else []
    method_section = {
        "dropout": {"k": k},
        "adversary": {"steps": args.adversary_steps},
    }
    steps = args.warmup + args.steps + 1
    mixed = "bf16" if args.dtype == "bf16" else "no"
    records: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    memory: dict[str, list[int]] = {v: [] for v in variants}
    shape: dict[str, int] = {}
    # With --profile, one more round under torch.profiler, left out of the measurements.
    for round_index in range(args.rounds + int(args.profile)):
        for variant in variants:
            name = "uegr" if variant == NAIVE else ("vanilla" if variant in (PLAIN, FLOOR) else variant)
            cfg_dict = run_config(
                root / f"{preset}-{k}-{seq}-{batch}-{variant}-{round_index}",
                preset,
                {**method_section, "name": name},
                seq=seq,
                batch_size=batch,
                steps=steps,
                mixed_precision=mixed,
            )
            cfg = load_config(None, cfg_dict)
            timer = StageTimer(args.device)
            _release_freed_memory()
            profile = round_index == args.rounds
            with PeakMemory(args.device) as peak, _profiler(profile, args.device) as profiler:
                if variant == PLAIN:
                    shape = plain_accelerate_run(cfg, timer, args.device)
                elif variant == FLOOR:
                    floor_run(cfg, timer, args.device)
                elif variant == NAIVE:
                    naive_uegr_run(cfg, timer, args.device)
                else:
                    instrumented_train(cfg, timer, args.device)
            if profiler is not None:
                PROFILES.append(_profile_table(profiler, f"{preset} K={k} S={seq} B={batch} {variant}", steps, args))
            else:
                records[variant].extend(timer.step_records(args.warmup))
                memory[variant].append(peak.added_bytes)
            progress.update(1)
    rows = []
    for variant in variants:
        stages = stage_breakdown(records[variant])
        step_s = stages.pop("step")
        flops = step_flops(variant, shape, k, args.adversary_steps, batch, seq)
        rows.append(
            {
                "config": preset,
                "params": shape["params"],
                "non_embedding_params": shape["non_embedding_params"],
                "k": k,
                "adversary_steps": args.adversary_steps,
                "seq": seq,
                "batch": batch,
                "variant": variant,
                "measured_steps": len(records[variant]),
                "step_s": step_s,
                "samples_per_s": batch / step_s,
                "tokens_per_s": batch * seq / step_s,
                "tflops": None if flops is None else flops / step_s / 1e12,
                "peak_memory_mb": max(memory[variant]) / 1e6,
                "stages_s": stages,
                "step_records": records[variant],
            }
        )
    return rows, ratios(rows, k, args.adversary_steps, args.peak_tflops)


def ratios(
    rows: Sequence[dict[str, Any]], k: int, adversary_steps: int, peak_tflops: float | None = None
) -> dict[str, Any]:
    """The targets' ratios for one grid point (None where a variant was not run)."""
    by = {row["variant"]: row for row in rows}
    first = rows[0]
    out: dict[str, Any] = {key: first[key] for key in ("config", "k", "seq", "batch")}

    def get(variant: str) -> dict[str, Any] | None:
        return by.get(variant)

    vanilla, plain, uegr, naive = get("vanilla"), get(PLAIN), get("uegr"), get(NAIVE)
    out["vanilla_over_plain"] = vanilla["step_s"] / plain["step_s"] if vanilla and plain else None
    if uegr and vanilla:
        out["uegr_over_floor"] = uegr["step_s"] / ((k + 1 + adversary_steps) * vanilla["step_s"])
    if uegr:
        out["mask_fraction"] = uegr["stages_s"]["saliency_mask"] / uegr["step_s"]
    floor = get(FLOOR)
    if floor and vanilla:
        out["vanilla_over_floor"] = vanilla["step_s"] / floor["step_s"]
    if floor and plain:
        out["plain_over_floor"] = plain["step_s"] / floor["step_s"]
    if peak_tflops:
        # Model FLOP utilisation against the device's dense peak (UEGR counting its K + 1 + T passes).
        for variant, key in ((FLOOR, "floor_mfu"), (PLAIN, "plain_mfu"), ("vanilla", "vanilla_mfu")):
            if get(variant) and get(variant)["tflops"]:
                out[key] = get(variant)["tflops"] / peak_tflops
        if uegr and uegr["tflops"]:
            out["uegr_utilisation"] = uegr["tflops"] / peak_tflops
    if uegr and naive:
        out["uegr_over_naive_speedup"] = naive["step_s"] / uegr["step_s"]
        ours = uegr["stages_s"]["forward"] + uegr["stages_s"]["backward"]
        sequential = naive["stages_s"]["forward"] + naive["stages_s"]["backward"]
        out["stacked_speedup"] = sequential / ours
    return out


# --- command line ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--methods", nargs="+", default=["vanilla", "uegr"], help=f"from {sorted(METHODS)}")
    parser.add_argument("--configs", nargs="+", default=["tiny", "roberta-base"], choices=sorted(PRESETS))
    parser.add_argument("--k", nargs="+", type=int, default=[2], help="UEGR sub-models")
    parser.add_argument("--seq", nargs="+", type=int, default=[64])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--adversary-steps", type=int, default=1, help="T (UEGR's adversary.steps)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out at the start of each run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (mixed precision)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    parser.add_argument("--floor", action="store_true", help="add the floor variant (fused AdamW, nothing else)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense peak (bf16 H100/H200 SXM: 989) for MFU"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="cpu", help="output names: throughput_<tag>.{json,csv,md,png}")
    parser.add_argument("--update-readme", action="store_true", help="put the table into benchmarks/README.md")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra round under torch.profiler (not measured): operator tables to profile_<tag>.txt",
    )
    parser.add_argument("--profile-rows", type=int, default=30, help="operators per table with --profile")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known methods: {', '.join(sorted(METHODS))}")
    for flag in ("k", "seq", "batch"):
        bad = [v for v in getattr(args, flag) if v < 1]
        if bad:
            parser.error(f"--{flag}: values must be >= 1, got {bad}")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0 or args.adversary_steps < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup and --adversary-steps >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= to keep accelerate on CPU")
    if args.dtype == "bf16" and args.device == "cpu":
        print("note: bf16 autocast on CPU is usually slower than fp32", file=sys.stderr)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid, write throughput_<tag>.json / .csv / .md / .png; returns the exit code."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks.throughput " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    grid = list(itertools.product(args.configs, args.k, args.seq, args.batch))
    variants = 1 + args.floor + len(args.methods) + ("uegr" in args.methods and not args.no_naive)
    rows: list[dict[str, Any]] = []
    all_ratios = []
    with (
        tempfile.TemporaryDirectory(prefix="uegr_throughput_") as tmp,
        tqdm(total=len(grid) * (args.rounds + int(args.profile)) * variants, desc="runs") as progress,
    ):
        for preset, k, seq, batch in grid:
            progress.set_postfix(config=preset, k=k, seq=seq, batch=batch)
            point_rows, point_ratios = measure(args, preset, k, seq, batch, Path(tmp), progress)
            rows.extend(point_rows)
            all_ratios.append(point_ratios)
    result = {
        "command": command.strip(),
        "machine": machine_info(args.device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "ratios": all_ratios,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"throughput_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_csv(stem.with_suffix(".csv"), rows)
    markdown = report.render(result)
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
    report.plot(result, stem.with_suffix(".png"))
    if args.update_readme:
        report.update_readme(README, markdown, section=f"throughput-{args.tag}")
    if PROFILES:
        args.out_dir.joinpath(f"profile_{args.tag}.txt").write_text("\n".join(PROFILES), encoding="utf-8")
    print(markdown)
    print(f"wrote {stem}.json / .csv / .md / .png" + (f", profile_{args.tag}.txt" if PROFILES else ""))
    return 0


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per variant and grid point, the stages as columns."""
    fields = [k for k in rows[0] if k not in ("stages_s", "step_records")] + [f"{s}_s" for s in STAGES]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {k: v for k, v in row.items() if k in fields}
            flat.update({f"{s}_s": row["stages_s"][s] for s in STAGES})
            writer.writerow(flat)


if __name__ == "__main__":
    sys.exit(main())
