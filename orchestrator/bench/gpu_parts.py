"""The measurements of `python -m orchestrator.bench gpu`, one function per part.

Each part yields one row per item it measured (a dict) and is run by orchestrator/bench/gpu.py
in a process of its own, under that part's time budget. Everything trains through the
project's own code: `trainers.loop.Trainer.train_step` (bf16 autocast on CUDA), batches drawn
from the trial's data source before the clock starts, and the input pipeline through
`trainers.data.build_data` (whatever decoder the shards source uses), never a decoder directly.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from orchestrator.bench.devices import device_name, mfu, peak_flops, synchronize
from trainers.config import TrainConfig

NUM_CLASSES = 8  # the 'shapes' classes the benchmarks train on
GB = 1e9


@dataclass(frozen=True)
class GpuBenchSettings:
    """Sizes and steps of every part; `full()` is the H100 acceptance run, `reduced()` the CPU's."""

    reduced: bool
    sizes: tuple[str, ...]  # the trainer part's models
    img: int
    patch: int
    registers: tuple[int, ...]
    batch: int
    steps: int
    warmup: int
    compile_warmup: int
    compile_backend: str  # "inductor" on a GPU; "eager" in the reduced form (inductor takes minutes on 2 cores)
    objective_size: str
    objective_batches: dict[str, int]
    dino: dict[str, Any] = field(default_factory=dict)
    clip: dict[str, Any] = field(default_factory=dict)
    pipeline_images: int = 2048
    pipeline_jpeg: tuple[int, int] = (500, 375)  # ImageNet-like width x height
    pipeline_batch: int = 256
    pipeline_steps: int = 10
    pipeline_workers: int = 8
    ddp_size: str = "small"
    ddp_batch: int = 128  # global: 2 ranks of half each
    budget_s: float = 480.0  # the whole run, all parts and process starts included

    @classmethod
    def full(cls) -> "GpuBenchSettings":
        # ViT-S/16 and ViT-B/16 at 224, registers 0 and 16, bf16, eager and compiled; the objectives at
        # ViT-B/16 with the shipped recipes' heads (DINO: 2 x 224 + 8 x 96 crops, 65536 prototypes),
        # each at a batch the plan's memory estimate puts well inside 80 GB.
        return cls(
            reduced=False, sizes=("small", "base"), img=224, patch=16, registers=(0, 16), batch=256, steps=20,
            warmup=5, compile_warmup=3, compile_backend="inductor", objective_size="base",
            objective_batches={"supervised": 256, "dino": 64, "clip": 256},
            dino={"local_crops": 8, "local_crop_size": 96},
        )

    @classmethod
    def reduced_form(cls, budget_s: float = 420.0) -> "GpuBenchSettings":
        """Every part at tiny sizes and a few steps: the CPU run in CI, so that the command cannot rot."""
        return cls(
            reduced=True, sizes=("micro", "mini"), img=32, patch=4, registers=(0, 16), batch=8, steps=2, warmup=1,
            compile_warmup=1, compile_backend="eager", objective_size="micro",
            objective_batches={"supervised": 8, "dino": 4, "clip": 8},
            dino={"local_crops": 2, "local_crop_size": 16, "head_prototypes": 1024, "head_hidden_dim": 128,
                  "head_bottleneck_dim": 32},
            clip={"embed_dim": 32, "text_width": 64, "text_layers": 2, "text_heads": 2, "context_length": 16},
            pipeline_images=64, pipeline_jpeg=(96, 72), pipeline_batch=16, pipeline_steps=3, pipeline_workers=0,
            ddp_size="micro", ddp_batch=8, budget_s=budget_s,
        )


def train_config(s: GpuBenchSettings, *, objective: str = "supervised", size: str, registers: int = 0,
                 batch: int, compile: bool = False) -> TrainConfig:
    raw: dict[str, Any] = {
        "objective": objective,
        "model": {"size": size, "img_size": s.img, "patch_size": s.patch, "num_registers": registers},
        "data": {"name": "shapes", "num_classes": NUM_CLASSES, "train_size": max(1024, 4 * batch), "val_size": 64},
        "optim": {"batch_size": batch, "warmup_steps": 0},
        "probe": {"every": 0, "at_end": False},
        "steps": 1000,
        "compile": compile,
        "precision": "bf16",
    }
    if objective == "dino":
        raw["dino"] = s.dino
    if objective == "clip" and s.clip:
        raw["clip"] = s.clip
    return TrainConfig.model_validate(raw)


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """torch.compile with `backend` for the Trainer's own compile call (inductor: as trials run)."""
    if backend == "inductor":
        yield
        return
    plain = torch.compile
    torch.compile = lambda model=None, **kwargs: plain(model, **{**kwargs, "backend": backend})  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = plain  # type: ignore[assignment]


def _peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def time_training(cfg: TrainConfig, device: torch.device, steps: int, warmup: int, backend: str) -> dict[str, Any]:
    """Images/s of Trainer.train_step on batches drawn from the trial's own source before timing."""
    import itertools

    from trainers.cost import objective_train_flops_per_image
    from trainers.loop import Trainer
    from trainers.memory import estimate_memory

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if cfg.compile:
        # Each compiled row compiles its own static graph, as a fresh trial does: without the reset
        # the next register count would recompile into a dynamic-shape graph (or, past Dynamo's
        # recompile limit, run eager).
        torch._dynamo.reset()
    with compile_backend(backend):
        trainer = Trainer(cfg, device)
        draw = trainer.data.train_batches(0, cfg.optim.batch_size)
        batches = itertools.cycle([next(draw) for _ in range(2)])
        start = time.perf_counter()
        for _ in range(warmup):  # compilation and autotuning happen here
            trainer.train_step(next(batches))
        synchronize(device)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(batches))
        synchronize(device)
        seconds = time.perf_counter() - start
    images_per_s = steps * cfg.optim.batch_size / seconds
    flops = objective_train_flops_per_image(cfg, NUM_CLASSES)
    row = {
        "images_per_s": images_per_s,
        "mfu": mfu(flops, images_per_s, peak_flops(device)),
        "step_ms": 1000 * seconds / steps,
        "warmup_s": warm_s,
        "batch": cfg.optim.batch_size,
        "memory_gb": _peak_memory_gb(device),
        "memory_estimate_gb": estimate_memory(cfg, NUM_CLASSES, bf16=True).total / GB,
    }
    del trainer, batches, draw
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- the parts

Item = tuple[str, float, Callable[[], dict[str, Any]]]  # (name, the least seconds it needs, measure)


def trainer_items(s: GpuBenchSettings, device: torch.device) -> list[Item]:
    items: list[Item] = []
    for compiled in (False, True):  # eager first: the compiled rows need the most time
        for size in s.sizes:
            for registers in s.registers:
                cfg = train_config(s, size=size, registers=registers, batch=s.batch, compile=compiled)
                warmup = s.compile_warmup if compiled else s.warmup
                name = f"ViT-{size}/{s.patch} {s.img}px r{registers} {'compiled' if compiled else 'eager'}"
                least = 45.0 if compiled and not s.reduced else 5.0

                def measure(cfg: TrainConfig = cfg, warmup: int = warmup) -> dict[str, Any]:
                    return time_training(cfg, device, s.steps, warmup, s.compile_backend)

                items.append((name, least, measure))
    return items


def objective_items(s: GpuBenchSettings, device: torch.device) -> list[Item]:
    items: list[Item] = []
    for objective, batch in s.objective_batches.items():
        cfg = train_config(s, objective=objective, size=s.objective_size, batch=batch)

        def measure(cfg: TrainConfig = cfg) -> dict[str, Any]:
            return time_training(cfg, device, s.steps, s.warmup, s.compile_backend)

        items.append((f"{objective} ViT-{s.objective_size}/{s.patch} {s.img}px", 5.0, measure))
    return items


def write_jpeg_shards(folder: Path, s: GpuBenchSettings) -> str:
    """A synthetic JPEG ImageFolder tree written as shards by the project's own shard writer."""
    from orchestrator.bench.data import write_synthetic_tree
    from trainers.data import shards

    tree = folder / "imagefolder"
    write_synthetic_tree(tree, s.pipeline_images, *s.pipeline_jpeg)
    with contextlib.redirect_stdout(io.StringIO()):
        shards.main(["write", str(tree), str(folder / "shards"), "--shard-size", "256"])
    return str(folder / "shards")


def pipeline_items(s: GpuBenchSettings, device: torch.device, folder: Path) -> list[Item]:
    """Images/s the shards source delivers on the device (decode: gpu, then cpu as the reference)."""
    from trainers.config import DataConfig
    from trainers.data import build_data

    holder: dict[str, str] = {}

    def source_rate(decode: str) -> dict[str, Any]:
        if "root" not in holder:
            start = time.perf_counter()
            holder["root"] = write_jpeg_shards(folder, s)
            holder["write_s"] = f"{time.perf_counter() - start:.1f}"
        cfg = DataConfig(name="shards", root=holder["root"], num_workers=s.pipeline_workers, decode=decode)
        source = build_data(cfg, img_size=s.img, seed=0, device=device)
        batches = source.train_batches(0, s.pipeline_batch)
        next(batches)  # worker start-up, first file opens
        synchronize(device)
        start = time.perf_counter()
        for _ in range(s.pipeline_steps):
            next(batches)
        synchronize(device)
        seconds = time.perf_counter() - start
        return {"images_per_s": s.pipeline_steps * s.pipeline_batch / seconds, "decode": decode,
                "batch": s.pipeline_batch, "workers": s.pipeline_workers,
                "jpeg": f"{s.pipeline_jpeg[0]}x{s.pipeline_jpeg[1]}", "shards_written_s": float(holder["write_s"])}

    return [(f"shards, decode {d}", 10.0, lambda d=d: source_rate(d)) for d in ("gpu", "cpu")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_rank(rank: int, cfg_json: str, backend: str, port: int, use_cuda: bool, results: Any) -> None:
    """One of two ranks: process group, a Trainer with DDP, one warm-up step, one timed step."""
    import torch.distributed as dist

    from trainers import loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    start = time.perf_counter()
    dist.init_process_group(backend, rank=rank, world_size=2)
    init_s = time.perf_counter() - start
    try:
        cfg = TrainConfig.model_validate_json(cfg_json)
        trainer = loop.Trainer(cfg, device, rank=rank, world_size=2)
        draw = trainer.data.train_batches(0, cfg.optim.batch_size)
        batches = [next(draw) for _ in range(2)]
        share = getattr(loop, "local_share", None)  # where the source yields the global batch, as Trainer.fit does
        if share is not None and len(batches[0]) == cfg.optim.batch_size and not trainer.objective.takes_its_own_share:
            batches = [share(batch, rank, 2) for batch in batches]
        trainer.train_step(batches[0])  # DDP builds its buckets on the first backward
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batches[1])
        synchronize(device)
        step_s = time.perf_counter() - start
        results.put({"rank": rank, "init_s": init_s, "step_s": step_s})
    finally:
        dist.destroy_process_group()


def ddp_items(s: GpuBenchSettings, device: torch.device, backend: str | None) -> list[Item]:
    """A 2-worker DDP step: NCCL on 2 visible GPUs, gloo on the CPU when asked (the reduced form)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    chosen = backend or ("nccl" if gpus >= 2 else None)
    if chosen is None:
        return []
    use_cuda = chosen == "nccl"

    def measure() -> dict[str, Any]:
        import torch.multiprocessing as mp

        cfg = train_config(s, size=s.ddp_size, batch=s.ddp_batch).model_copy(
            update={"precision": "bf16" if use_cuda else "fp32"}
        )
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        start = time.perf_counter()
        mp.start_processes(_ddp_rank, args=(cfg.model_dump_json(), chosen, free_port(), use_cuda, results),
                           nprocs=2, join=True, start_method="spawn")
        rows = sorted((results.get() for _ in range(2)), key=lambda r: r["rank"])
        return {"backend": chosen, "model": f"ViT-{s.ddp_size}", "global_batch": s.ddp_batch,
                "step_s": max(r["step_s"] for r in rows), "init_s": max(r["init_s"] for r in rows),
                "ranks": rows, "wall_s": time.perf_counter() - start}

    return [(f"2 workers, {chosen}", 15.0 if not s.reduced else 5.0, measure)]


def part_items(part: str, s: GpuBenchSettings, device: torch.device, folder: Path, ddp_backend: str | None) -> list[Item]:
    if part == "trainer":
        return trainer_items(s, device)
    if part == "objectives":
        return objective_items(s, device)
    if part == "pipeline":
        return pipeline_items(s, device, folder)
    return ddp_items(s, device, ddp_backend)


def run_part(part: str, settings_json: str, device: str, deadline: float, ddp_backend: str | None, out: Any) -> None:
    """A part's process: measure item after item, each row sent as it is done; an item that could
    not finish before `deadline` (time.time()) is skipped and said so."""
    import json

    s = GpuBenchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings_json).items()})
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        out.put({"device_name": device_name(dev)})
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        items = part_items(part, s, dev, Path(tmp), ddp_backend)
        if not items:
            out.put({"skipped": part, "reason": "fewer than 2 GPUs visible (--ddp-backend gloo runs it on the CPU)"})
        for name, least, measure in items:
            left = deadline - time.time()
            if left < least:
                out.put({"item": name, "skipped": f"budget: {left:.0f} s left of the part, it needs at least {least:.0f} s"})
                continue
            try:
                out.put({"item": name, **measure()})
            except Exception as exc:  # noqa: BLE001 - one failed item is a row, the others still run
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                out.put({"item": name, "error": f"{type(exc).__name__}: {first[:300]}"})
    out.put({"done": part})
