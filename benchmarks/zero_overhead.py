"""Cost of UEGR's gradient mask under DeepSpeed ZeRO (and plain DDP) with several CPU processes.

Run under `accelerate launch` with one of configs/accelerate/cpu-2proc-{ddp,zero1,zero2,zero3}.yaml, e.g.

    accelerate launch --config_file configs/accelerate/cpu-2proc-zero2.yaml -m benchmarks.zero_overhead --model base

It drives the real `uegr_dist.engine.train_loop.train()` (UEGR, method defaults: K=2 sub-models, 1 adversary step,
global hard top-30% mask, taylor saliency, max_grad_norm 1) on synthetic text with a random-init RoBERTa, and wraps,
at run time only (the package is not edited):

- `ZeroGradientMasker.compute_masks` (scoring + radix top-k threshold selection + zeroing the dropped coordinates +
  the masked-gradient norm for clipping) and the masker's hook on the inner optimizer step (clip factor + handing
  the masks to MaskedAdamW): their wall time per optimizer step is the *masking time*;
- `UEGR.loss`: the interval between the starts of consecutive training iterations is the *step time*
  (forward + adversary + backward + the whole ZeRO step, scheduler, zero_grad);
- `torch.distributed` collectives while the masking code runs: numel * element_size summed per step;
- at the last measured step, the tensors each rank holds (see `memory_snapshot`) and its peak RSS.

Under DDP (no ZeRO masker) the mask is built by `GradientMasker.apply_` inside `SelectiveAdamW.step` (timed).
Rank 0 prints one JSON line (all ranks' numbers) and appends it to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import machine_info, peak_rss_bytes, run_config
from uegr_dist.backward import GradientMasker, SelectiveAdamW, ZeroGradientMasker
from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train
from uegr_dist.methods.uegr import UEGR

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "reduce")

# --model names: the presets of benchmarks/common.py (base = RobertaConfig defaults, roberta-base's 125M parameters
# with the full vocabulary).
MODELS = {"base": "roberta-base", "tiny": "tiny"}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def write_config(root: Path, args: argparse.Namespace, world: int) -> Path:
    """root/run.yaml: a UEGR run (method defaults) on synthetic text written under root."""
    import yaml

    cfg = run_config(
        root,
        MODELS[args.model],
        {"name": args.method},
        seq=args.seq,
        batch_size=args.batch_size,
        steps=args.warmup + args.steps + 1,  # +1: the last measured step ends when the next one starts
        vocab=args.vocab,
        world=world,
    )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj: Any, depth: int = 0):
    """Tensors reachable through lists / tuples / dicts (not through other objects)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _walk(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _walk(item, depth + 1)


def memory_snapshot(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Bytes of the distinct tensor storages this rank holds, by role (each storage counted once, first role wins):

    param: the model's parameters (ZeRO-3: their `ds_tensor` shards; ZeRO-1/2 in fp32: the flat groups they view);
    optimizer_state: the inner optimizer's state (Adam exp_avg / exp_avg_sq / step) + the fp32 master partitions it
      updates (ZeRO: separate copies; DDP: these are the parameters, already counted);
    grad: `.grad` of parameters and master partitions + every tensor in a ZeRO optimizer attribute whose name
      contains "grad" or "ipg" (averaged_gradients, grads_in_partition, grad_partitions_flat_buffer, ipg buffers);
    other_zero: any other tensor held directly by the ZeRO optimizer (e.g. bit16 flat groups not viewed by params).
    DDP's reducer buckets (a second full gradient copy inside the C++ reducer) are not reachable and not counted.
    """
    seen: dict[int, str] = {}
    sizes: dict[str, int] = {"param": 0, "optimizer_state": 0, "grad": 0, "other_zero": 0}
    sources: dict[str, int] = {}

    def add(t: torch.Tensor | None, role: str, source: str = "") -> None:
        if t is None or t.device.type == "meta":
            return
        ptr, nbytes = _storage(t)
        if ptr == 0 or ptr in seen:
            return
        seen[ptr] = role
        sizes[role] += nbytes
        key = f"{role}:{source}" if source else role
        sources[key] = sources.get(key, 0) + nbytes

    params = list(model.parameters())
    for p in params:
        add(p.data, "param")
        add(getattr(p, "ds_tensor", None), "param")
    zopt = getattr(optimizer, "optimizer", optimizer)  # accelerate wrapper -> DeepSpeed ZeRO optimizer or torch
    inner = getattr(zopt, "optimizer", zopt)  # ZeRO optimizer -> MaskedAdamW
    for state in inner.state.values():
        for t in _walk(state):
            add(t, "optimizer_state")
    masters = [m for group in inner.param_groups for m in group["params"]]
    for m in masters:
        add(m.data, "optimizer_state")
    for p in params:
        add(p.grad, "grad", "param.grad")
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            add(ds.grad, "grad", "param.grad")
    for m in masters:
        add(m.grad, "grad", "master.grad")
    if zopt is not inner:
        items = [(k, v) for k, v in vars(zopt).items() if k != "optimizer"]
        for key, value in items:
            if "grad" in key.lower() or "ipg" in key.lower():
                for t in _walk(value):
                    add(t, "grad", key)
        for key, value in items:
            for t in _walk(value):
                add(t, "other_zero", key)
                add(t.grad, "grad", key + ".grad")
    return {**sizes, "by_source": sources}  # type: ignore[dict-item]


class Recorder:
    """Run-time wrappers around UEGR and the ZeRO masker; per-step numbers of this rank."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step
        self.loss_starts: list[float] = []
        self.mask_seconds: dict[int, float] = {}
        self.comm_bytes: dict[int, int] = {}
        self.comm_calls: dict[int, int] = {}
        self.select_seconds: dict[int, float] = {}
        self.memory: dict[str, dict[str, Any]] = {}
        self.ctx: Any = None
        self.optimizer: Any = None
        self.step = 0
        self.stage = "ddp"

    def add_time(self, seconds: float) -> None:
        self.mask_seconds[self.step] = self.mask_seconds.get(self.step, 0.0) + seconds

    def snapshot(self, where: str) -> None:
        if self.step == self.last_step and self.ctx is not None:
            # The optimizer whose state counts: DeepSpeed's ZeRO optimizer (its inner one is ours), or ours.
            snap = memory_snapshot(self.ctx.model, getattr(self.ctx.model, "optimizer", self.optimizer))
            roles = ("param", "optimizer_state", "grad", "other_zero")
            # Called once per parameter group in the inner step: keep the largest.
            if where not in self.memory or sum(snap[r] for r in roles) > sum(self.memory[where][r] for r in roles):
                self.memory[where] = snap

    def install(self) -> None:
        rec = self
        original_loss, original_setup = UEGR.loss, UEGR.setup
        original_attach, original_apply = SelectiveAdamW.attach, GradientMasker.apply_
        original_compute, original_hooks = ZeroGradientMasker.compute_masks, ZeroGradientMasker._install_hooks

        def loss(self: UEGR, model, batch, step, micro_step):
            rec.loss_starts.append(time.perf_counter())
            rec.step = step
            return original_loss(self, model, batch, step, micro_step)

        def setup(self: UEGR, ctx):
            rec.ctx = ctx
            return original_setup(self, ctx)

        def attach(self: SelectiveAdamW, backend):
            rec.optimizer = self
            return original_attach(self, backend)

        def apply_(self: GradientMasker, step=None):
            rec.snapshot("after_backward")  # DDP: all-reduced gradients in p.grad, optimizer state from earlier steps
            tic = time.perf_counter()
            with rec.count_collectives():
                out = original_apply(self, step)
            rec.add_time(time.perf_counter() - tic)
            return out

        def compute_masks(self: ZeroGradientMasker):
            rec.stage = type(self.engine.optimizer).__name__
            tic = time.perf_counter()
            with rec.count_collectives():
                out = original_compute(self)
            rec.add_time(time.perf_counter() - tic)
            rec.snapshot("in_zero_step")  # averaged gradient partitions in place, masked
            return out

        def install_hooks(self: ZeroGradientMasker):
            # Time the inner (MaskedAdamW) step alone, then the masker's hook around it: the difference is the hook.
            bare = self.inner.step

            def timed_bare(*a, **k):
                rec.snapshot("in_inner_step")  # ZeRO-1/2: the flat fp32 gradient partition is now master.grad
                tic = time.perf_counter()
                out = bare(*a, **k)
                rec.add_time(-(time.perf_counter() - tic))
                return out

            self.inner.step = timed_bare
            original_hooks(self)
            hooked = self.inner.step

            def timed_hooked(*a, **k):
                tic = time.perf_counter()
                with rec.count_collectives():
                    out = hooked(*a, **k)
                rec.add_time(time.perf_counter() - tic)
                return out

            self.inner.step = timed_hooked

        UEGR.loss, UEGR.setup = loss, setup
        SelectiveAdamW.attach, GradientMasker.apply_ = attach, apply_
        ZeroGradientMasker.compute_masks, ZeroGradientMasker._install_hooks = compute_masks, install_hooks

        import uegr_dist.backward.masking as masking

        original_select = masking.select_top_k

        def select_top_k(*a, **k):
            tic = time.perf_counter()
            out = original_select(*a, **k)
            rec.select_seconds[rec.step] = rec.select_seconds.get(rec.step, 0.0) + time.perf_counter() - tic
            return out

        masking.select_top_k = select_top_k

    def count_collectives(self):
        rec = self

        class Counting:
            def __enter__(self):
                self.saved = {name: getattr(dist, name) for name in COLLECTIVES}
                for name in COLLECTIVES:
                    setattr(dist, name, self.recorder(name))

            def recorder(self, name: str):
                def call(tensor, *args, **kwargs):
                    tensors = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
                    nbytes = sum(t.numel() * t.element_size() for t in tensors)
                    rec.comm_bytes[rec.step] = rec.comm_bytes.get(rec.step, 0) + nbytes
                    rec.comm_calls[rec.step] = rec.comm_calls.get(rec.step, 0) + 1
                    return self.saved[name](tensor, *args, **kwargs)

                return call

            def __exit__(self, *exc):
                for name, function in self.saved.items():
                    setattr(dist, name, function)

        return Counting()

    def summary(self, warmup: int, steps: int) -> dict[str, Any]:
        measured = range(warmup, warmup + steps)
        step_s = [self.loss_starts[i + 1] - self.loss_starts[i] for i in measured]
        mask_s = [self.mask_seconds.get(i, 0.0) for i in measured]
        select_s = [self.select_seconds.get(i, 0.0) for i in measured]
        roles = ("param", "optimizer_state", "grad", "other_zero")
        memory = max(self.memory.values(), key=lambda m: sum(m[r] for r in roles)) if self.memory else {}
        return {
            "rank": rank(),
            "optimizer": self.stage,
            "step_s": step_s,
            "mask_s": mask_s,
            "select_s": select_s,
            "median_step_s": statistics.median(step_s),
            "median_mask_s": statistics.median(mask_s),
            "median_select_s": statistics.median(select_s),
            "overhead_pct": 100 * statistics.median(m / s for m, s in zip(mask_s, step_s)),
            "comm_bytes_per_step": [self.comm_bytes.get(i, 0) for i in measured],
            "comm_calls_per_step": [self.comm_calls.get(i, 0) for i in measured],
            "memory_bytes": memory,
            "memory_snapshots": self.memory,
            "optimizer_plus_grad_bytes": memory.get("optimizer_state", 0) + memory.get("grad", 0),
            "peak_rss_bytes": peak_rss_bytes(),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="base")
    parser.add_argument("--vocab", type=int, default=50265, help="vocab_size (RobertaConfig default 50265)")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps left out before measuring")
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--method", choices=("uegr",), default="uegr")
    parser.add_argument("--label", default="", help="free text copied into the JSON line (e.g. the launcher)")
    parser.add_argument("--out", default=None, help="append rank 0's JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 processes on a 2-core machine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One folder per launch (the ranks share their launcher's pid), one sub-folder per rank.
    root = Path(tempfile.gettempdir()) / f"uegr_bench_{os.environ.get('MASTER_PORT', 'x')}_{os.getppid()}"
    rank_root = root / f"r{rank()}"
    rank_root.mkdir(parents=True, exist_ok=True)
    config = write_config(rank_root, args, world)

    recorder = Recorder(last_step=args.warmup + args.steps - 1)
    recorder.install()
    train(load_config(config))
    mine = recorder.summary(args.warmup, args.steps)
    params = None
    if recorder.ctx is not None:
        params = sum(int(getattr(p, "ds_numel", p.numel())) for _, p in recorder.ctx.named_parameters)
    # The process group may be gone after train(): exchange the per-rank numbers through files.
    (root / f"rank{rank()}.json").write_text(json.dumps(mine), encoding="utf-8")
    everyone = [mine]
    if rank() == 0:
        deadline = time.time() + 120
        files = [root / f"rank{r}.json" for r in range(world)]
        while not all(f.exists() for f in files) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(0.5)
        everyone = [json.loads(f.read_text(encoding="utf-8")) for f in files if f.exists()]
    if rank() == 0:
        line = {
            "label": args.label,
            "model": args.model,
            "vocab": args.vocab,
            "parameters": params,
            "torch_threads": torch.get_num_threads(),
            "batch_per_process": args.batch_size,
            "seq": args.seq,
            "method": args.method,
            "world_size": len(everyone),
            "machine": machine_info(),
            "ranks": everyone,
        }
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
