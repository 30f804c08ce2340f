"""Trainer throughput: our Trainer against a plain PyTorch loop on the same model and data.

Both train the same timm ViT (trainers.model.build_model) on the same 'shapes' images,
rendered once on the device before either clock starts and cycled (MATERIALISED_BATCHES
batches): neither loop pays for its data, so the figures compare the training steps alone
(`bench data` measures the input pipeline). Both loops are built and warmed up first, then
timed in alternating blocks, so that a shared machine's drift in speed favours neither. Ours: Trainer.train_step (bf16 autocast, TF32 for
what stays fp32, and fused AdamW on CUDA; torch.compile with --compile). Plain: torch AdamW,
fp32, eager, under PyTorch's default float32 settings (TF32 off for matmuls): the Trainer
turns TF32 on process-wide, so each loop runs inside `float32_matmul` and the flags are put
back after it. Warmup steps are excluded, and CUDA is synchronised before every clock read.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from orchestrator.bench.devices import bench_device, device_name, mfu, peak_flops, synchronize
from trainers.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.cost import train_flops_per_image
from trainers.data.base import Batch
from trainers.model import build_model

NUM_CLASSES = 8
MATERIALISED_BATCHES = 4  # both loops cycle over this many distinct batches
ROUNDS = 3  # alternating timed blocks per loop


@dataclass(frozen=True)
class TrainerBenchSettings:
    size: str
    img: int
    patch: int
    registers: int
    batch: int
    steps: int
    warmup: int
    compile: bool = False
    copies: int = 1  # >1: also run this many copies of our trainer at once on the one device

    @classmethod
    def defaults(cls, device: torch.device) -> "TrainerBenchSettings":
        if device.type == "cuda":
            return cls(size="base", img=224, patch=16, registers=0, batch=256, steps=30, warmup=10)
        # About 30 s for both loops on 2 CPU cores.
        return cls(size="micro", img=32, patch=4, registers=4, batch=64, steps=30, warmup=5)


def train_config(s: TrainerBenchSettings) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(size=s.size, img_size=s.img, patch_size=s.patch, num_registers=s.registers),
        data=DataConfig(
            name="shapes", num_classes=NUM_CLASSES, train_size=max(4096, s.batch * MATERIALISED_BATCHES), val_size=s.batch
        ),
        optim=OptimConfig(batch_size=s.batch, warmup_steps=0),
        probe=ProbeConfig(every=0, at_end=False),
        steps=s.warmup + s.steps,
        compile=s.compile,
    )


def _images_per_second(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


@contextlib.contextmanager
def float32_matmul(tf32: bool | None) -> Iterator[None]:
    """Run the block with TF32 matmuls on (True) or with PyTorch's defaults (None: matmul TF32
    off, cuDNN TF32 on), and put the process-wide flags back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = True if tf32 is None else tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prebuilt_batches(cfg: TrainConfig, device: torch.device, count: int = MATERIALISED_BATCHES) -> list[Batch]:
    """`count` training batches of the 'shapes' data, rendered on `device` before any clock starts."""
    from trainers.data import build_data

    source = build_data(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed, device=device)
    batches = source.train_batches(0, cfg.optim.batch_size)
    return [next(batches) for _ in range(count)]


def _timed(step: Any, batches: Iterator[Batch], device: torch.device, steps: int) -> float:
    """Seconds of `steps` calls of step(batch), the device synchronised at both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    synchronize(device)
    return time.perf_counter() - start


def ours_step(cfg: TrainConfig, device: torch.device) -> Any:
    """Trainer.train_step; building the Trainer turns TF32 on process-wide on CUDA, so it is built
    inside float32_matmul and the flags are put back."""
    from trainers.loop import Trainer

    with float32_matmul(tf32=device.type == "cuda"):
        return Trainer(cfg, device).train_step


def plain_step(cfg: TrainConfig, device: torch.device) -> Any:
    """One step of the plain loop: timm model, torch AdamW, fp32, eager."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def step(batch: Batch) -> None:
        loss = F.cross_entropy(model(batch.images), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# Each loop under the float32 settings it stands for: ours with the Trainer's TF32, the plain one
# with PyTorch's defaults (matmul TF32 off).
OURS_TF32 = {"cuda": True}


def paired_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int,
                      batches: Sequence[Batch] | None = None, rounds: int = ROUNDS) -> tuple[float, float]:
    """(ours, plain) images/s. Both loops are built and warmed up first, then timed in `rounds`
    alternating blocks of steps / rounds each, so that a drift in a shared machine's speed falls
    on both alike; each block runs under its loop's float32 settings."""
    batches = batches if batches is not None else prebuilt_batches(cfg, device)
    loops = {"ours": (ours_step(cfg, device), OURS_TF32.get(device.type, False)), "plain": (plain_step(cfg, device), None)}
    cycles = {name: itertools.cycle(batches) for name in loops}
    for name, (step, tf32) in loops.items():
        with float32_matmul(tf32):
            _timed(step, cycles[name], device, warmup)  # also pays for torch.compile and autotuning
    seconds = dict.fromkeys(loops, 0.0)
    blocks = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for block in (b for b in blocks if b):
        for name, (step, tf32) in loops.items():
            with float32_matmul(tf32):
                seconds[name] += _timed(step, cycles[name], device, block)
    del loops, cycles
    _release(device)
    images = steps * cfg.optim.batch_size
    return _images_per_second(images, seconds["ours"]), _images_per_second(images, seconds["plain"])


def trainer_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int,
                       batches: Sequence[Batch] | None = None) -> float:
    """Images/s of Trainer.train_step alone on prebuilt batches."""
    batches = batches if batches is not None else prebuilt_batches(cfg, device)
    step, cycle = ours_step(cfg, device), itertools.cycle(batches)
    with float32_matmul(OURS_TF32.get(device.type, False)):
        _timed(step, cycle, device, warmup)
        seconds = _timed(step, cycle, device, steps)
    del step
    _release(device)
    return _images_per_second(steps * cfg.optim.batch_size, seconds)


def baseline_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int,
                        batches: Sequence[Batch] | None = None) -> float:
    """Images/s of the plain loop alone, under PyTorch's default float32 settings."""
    batches = batches if batches is not None else prebuilt_batches(cfg, device)
    step, cycle = plain_step(cfg, device), itertools.cycle(batches)
    with float32_matmul(None):
        _timed(step, cycle, device, warmup)
        seconds = _timed(step, cycle, device, steps)
    del step
    _release(device)
    return _images_per_second(steps * cfg.optim.batch_size, seconds)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- packing several trials on one GPU


def _packed_copy(cfg_json: str, device: str, steps: int, warmup: int, barrier: Any, results: Any) -> None:
    """One of K concurrent copies: warm up, wait for the others, then time `steps` steps."""
    from trainers.loop import Trainer

    cfg = TrainConfig.model_validate_json(cfg_json)
    dev = torch.device(device)
    trainer = Trainer(cfg, dev)
    batches = itertools.cycle(prebuilt_batches(cfg, dev))
    for _ in range(warmup):
        trainer.train_step(next(batches))
    synchronize(dev)
    barrier.wait()
    start = time.time()  # wall clock: comparable across processes
    for _ in range(steps):
        trainer.train_step(next(batches))
    synchronize(dev)
    results.put((start, time.time(), steps * cfg.optim.batch_size))


def packed_throughput(cfg: TrainConfig, device: torch.device, copies: int, steps: int, warmup: int) -> dict[str, Any]:
    """Aggregate images/s of `copies` trainer processes sharing one GPU (as fractional-GPU trials do)."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, results = ctx.Barrier(copies), ctx.Queue()
    procs = [
        ctx.Process(target=_packed_copy, args=(cfg.model_dump_json(), str(device), steps, warmup, barrier, results))
        for _ in range(copies)
    ]
    for proc in procs:
        proc.start()
    rows = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    start, end = min(r[0] for r in rows), max(r[1] for r in rows)
    return {"copies": copies, "aggregate_imgs_per_s": _images_per_second(sum(r[2] for r in rows), end - start)}


# ----------------------------------------------------------------- the benchmark


def run_trainer_bench(settings: TrainerBenchSettings, device: torch.device | None = None) -> dict[str, Any]:
    device = device or bench_device()
    cfg = train_config(settings)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = prebuilt_batches(cfg, device)  # the same images for both loops
    ours, plain = paired_throughput(cfg, device, settings.steps, settings.warmup, batches)
    del batches
    flops = train_flops_per_image(cfg.model, NUM_CLASSES)
    peak = peak_flops(device)
    result: dict[str, Any] = {
        "benchmark": "trainer",
        "device": device_name(device),
        "config": {**asdict(settings), "precision": "bf16" if device.type == "cuda" else "fp32"},
        # What each loop ran under: the figures compare steps on the same prebuilt device batches.
        "fairness": {
            "data": f"{MATERIALISED_BATCHES} batches prebuilt on the device, cycled by both loops",
            "timing": f"{ROUNDS} alternating blocks per loop after both warmed up",
            "ours_float32": "TF32" if device.type == "cuda" else "fp32",
            "baseline_float32": "PyTorch defaults (matmul TF32 off)",
        },
        "imgs_per_s": ours,
        "baseline_imgs_per_s": plain,
        "speedup": ours / plain,
        "train_flops_per_image": flops,
        "peak_flops": peak,
        "mfu": mfu(flops, ours, peak),
        "baseline_mfu": mfu(flops, plain, peak),
    }
    if settings.copies > 1:
        if device.type != "cuda":
            result["packing"] = {"copies": settings.copies, "skipped": "no GPU: packing trials is a GPU question"}
        else:
            packed = packed_throughput(cfg, device, settings.copies, settings.steps, settings.warmup)
            packed["vs_one_per_gpu"] = packed["aggregate_imgs_per_s"] / ours
            result["packing"] = packed
    return result


def with_overrides(settings: TrainerBenchSettings, **overrides: Any) -> TrainerBenchSettings:
    """Settings with the given fields replaced; None means keep the default."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def format_trainer_result(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"device      {r['device']}",
        f"model       ViT-{c['size']}/{c['patch']} at {c['img']} px, {c['registers']} registers, batch {c['batch']},"
        f" {c['steps']} timed steps after {c['warmup']} warmup, compile={c['compile']}",
        f"ours        {r['imgs_per_s']:10.1f} img/s" + _mfu_text(r["mfu"]),
        f"plain loop  {r['baseline_imgs_per_s']:10.1f} img/s" + _mfu_text(r["baseline_mfu"]),
        f"speedup     {r['speedup']:10.2f}x",
    ]
    packing = r.get("packing")
    if packing:
        if "skipped" in packing:
            lines.append(f"packing     {packing['copies']} copies: skipped ({packing['skipped']})")
        else:
            lines.append(
                f"packing     {packing['copies']} copies on one GPU: {packing['aggregate_imgs_per_s']:.1f} img/s"
                f" in all, {packing['vs_one_per_gpu']:.2f}x one copy"
            )
    return "\n".join(lines)


def _mfu_text(value: float | None) -> str:
    return "" if value is None else f"   MFU {100 * value:.1f}%"
