"""Is a trial input-bound? Images/s of the input pipeline alone beside images/s the trainer consumes.

pipeline  DataSource.train_batches for the config, as Trainer.fit draws them: read, decode,
          crop, copy, normalise on the device (the same code path as training), nothing else.
trainer   Trainer.train_step on one batch already on the device, repeated: the model's appetite.

If the pipeline is slower than the trainer, the trial waits for data (input_bound). With no
--root the bench writes a synthetic JPEG ImageFolder tree (and shards of it) to a temporary
folder first, so it runs anywhere; give --root to measure real data, local or s3://.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.bench.devices import device_name, synchronize
from trainers.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig


DECODE_TEXT = {
    "cpu": "in the workers (torchvision decode_jpeg)",
    "gpu": "on the device (batched decode_jpeg)",
    "pil": "in the workers (PIL)",
}


@dataclass(frozen=True)
class DataBenchSettings:
    data: str  # shards | imagefolder
    root: str | None  # None: write a synthetic set
    images: int  # synthetic set: training images
    width: int
    height: int
    size: str
    img: int
    patch: int
    batch: int
    steps: int
    warmup: int
    workers: int
    decode: str
    compile: bool = False

    @classmethod
    def defaults(cls, device: torch.device) -> "DataBenchSettings":
        if device.type == "cuda":  # ImageNet-like JPEGs (about 500x375) into ViT-S/16 at 224
            return cls(data="shards", root=None, images=2048, width=500, height=375, size="small", img=224,
                       patch=16, batch=256, steps=20, warmup=5, workers=8, decode="auto")
        # Small enough for 2 shared CPU cores in about half a minute.
        return cls(data="shards", root=None, images=256, width=320, height=240, size="micro", img=64, patch=8,
                   batch=32, steps=8, warmup=2, workers=2, decode="auto")


def with_overrides(settings: DataBenchSettings, **overrides: Any) -> DataBenchSettings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def write_synthetic_tree(root: Path, images: int, width: int, height: int, classes: int = 8) -> None:
    """JPEG ImageFolder tree of smooth random pictures (compressing like photos, unlike noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(classes, images // 8))):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
            picture = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
            picture.save(folder / f"{i:06d}.jpg", quality=90)


def train_config(s: DataBenchSettings, root: str) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(size=s.size, img_size=s.img, patch_size=s.patch),
        data=DataConfig(name=s.data, root=root, num_workers=s.workers, decode=s.decode),
        optim=OptimConfig(batch_size=s.batch, warmup_steps=0),
        probe=ProbeConfig(every=0, at_end=False),
        steps=s.warmup + s.steps,
        compile=s.compile,
    )


def pipeline_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> float:
    from trainers.data import build_data

    source = build_data(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed, device=device)
    batches = source.train_batches(0, cfg.optim.batch_size)
    for _ in range(warmup):  # worker start-up, first file opens
        next(batches)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
    synchronize(device)
    seconds = time.perf_counter() - start
    del batch, batches, source
    return steps * cfg.optim.batch_size / seconds


def trainer_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> float:
    from trainers.loop import Trainer

    trainer = Trainer(cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0})}), device)
    batch = next(trainer.data.train_batches(0, cfg.optim.batch_size))  # on the device; reused every step
    for _ in range(warmup):
        trainer.train_step(batch)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    del trainer
    return steps * cfg.optim.batch_size / seconds


def run_data_bench(settings: DataBenchSettings, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = settings.root
        if root is None:
            tree = Path(tmp) / "imagefolder"
            write_synthetic_tree(tree, settings.images, settings.width, settings.height)
            root = str(tree)
            if settings.data == "shards":
                from trainers.data.shard_writer import write_shards

                write_shards(tree, Path(tmp) / "shards", shard_size=256)
                root = str(Path(tmp) / "shards")
        cfg = train_config(settings, root)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        pipeline = pipeline_throughput(cfg, device, settings.steps, settings.warmup)
        trainer = trainer_throughput(cfg, device, settings.steps, settings.warmup)
    decode = settings.decode if settings.decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if settings.data == "imagefolder":
        decode = "pil"  # PIL decode and transforms in the workers; shards decode with torchvision
    return {
        "benchmark": "data",
        "device": device_name(device),
        "config": {**asdict(settings), "root": settings.root or "synthetic", "decode": decode},
        "pipeline_imgs_per_s": pipeline,
        "trainer_imgs_per_s": trainer,
        "pipeline_over_trainer": pipeline / trainer,
        "input_bound": pipeline < trainer,
    }


def format_data_result(r: dict[str, Any]) -> str:
    c = r["config"]
    verdict = (
        f"input-bound: the trainer could take {1 / r['pipeline_over_trainer']:.1f}x what the pipeline delivers"
        if r["input_bound"]
        else f"not input-bound: the pipeline delivers {r['pipeline_over_trainer']:.1f}x what the trainer takes"
    )
    return "\n".join([
        f"device      {r['device']}",
        f"data        {c['data']} ({c['root']}), decode {DECODE_TEXT[c['decode']]}, {c['workers']} workers,"
        f" batch {c['batch']}",
        f"model       ViT-{c['size']}/{c['patch']} at {c['img']} px, {c['steps']} timed steps after {c['warmup']} warmup",
        f"pipeline    {r['pipeline_imgs_per_s']:10.1f} img/s",
        f"trainer     {r['trainer_imgs_per_s']:10.1f} img/s",
        verdict,
    ])
