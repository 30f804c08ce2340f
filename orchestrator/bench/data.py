"""Is a trial input-bound? Per rank: images/s one rank's input pipeline delivers beside images/s
one worker's trainer consumes.

pipeline  DataSource.train_batches as Trainer.fit draws them on rank 0 of `ranks` (the trial's
          data-parallel workers): read, decode and crop this rank's share of each global batch
          (with the objective's crop plan: 3-Augment's repeats, DINO's multi-crop), copy,
          normalise on the device; nothing else.
trainer   Trainer.train_step at the per-worker batch (global batch / ranks) on one batch already
          on the device, repeated: one worker's appetite.

Each rank has its own pipeline, so a trial is input-bound when one rank's pipeline is slower
than one worker's trainer (input_bound): adding workers does not help then, more loader
workers or GPU decoding do. --spec takes the model, objective, recipe, global batch and
workers of a sweep spec's first trial (shrink the model with --size/--img/--patch on a CPU).
With no --root (and no reachable data root in the spec) the bench writes a synthetic JPEG
ImageFolder tree (and shards of it) to a temporary folder first, so it runs anywhere.
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
from trainers.data.sampling import EpochOrder, share_keys


DECODE_TEXT = {
    "cpu": "in the workers (torchcodec)",
    "gpu": "on the device (torchcodec, batched nvJPEG; one batched crop)",
    "pil": "in the workers (PIL)",
    "generated": "none (generated on the device)",
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
    ranks: int = 1  # data-parallel workers of the trial: the pipeline is rank 0's, the trainer one worker's
    spec: str | None = None  # a sweep spec: its first trial's config (model, objective, recipe, batch, workers)

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


def train_config(s: DataBenchSettings, root: str | None) -> TrainConfig:
    if s.spec is not None:
        return spec_config(s, root)
    return TrainConfig(
        model=ModelConfig(size=s.size, img_size=s.img, patch_size=s.patch),
        data=DataConfig(name=s.data, root=root, num_workers=s.workers, decode=s.decode),
        optim=OptimConfig(batch_size=s.batch, warmup_steps=0),
        probe=ProbeConfig(every=0, at_end=False),
        steps=s.warmup + s.steps,
        compile=s.compile,
    )


def spec_trial(path: str) -> tuple[TrainConfig, int]:
    """The first trial's config of a sweep spec and its data-parallel workers."""
    from orchestrator.spec.schema import load_spec

    spec = load_spec(path)
    return spec.trial_config(spec.assignments()[0]), spec.resources.workers


def spec_config(s: DataBenchSettings, root: str | None) -> TrainConfig:
    """The spec's first trial, with the bench's explicit overrides (model size, data root, loader)."""
    cfg, _ = spec_trial(s.spec)  # type: ignore[arg-type]
    data = cfg.data
    if root is not None:
        data = data.model_copy(update={"name": s.data, "root": root})
    data = data.model_copy(update={"num_workers": s.workers, "decode": s.decode})
    model = cfg.model.model_copy(update={"size": s.size, "img_size": s.img, "patch_size": s.patch})
    dino = cfg.dino
    if cfg.objective == "dino" and dino.local_crop_size % s.patch:
        dino = dino.model_copy(update={"local_crop_size": s.patch * max(1, round(dino.local_crop_size / s.patch))})
    return cfg.model_copy(update={
        "model": model, "data": data, "dino": dino, "probe": ProbeConfig(every=0, at_end=False),
        "steps": s.warmup + s.steps, "compile": s.compile, "eval_every": 0, "checkpoint_every": 0,
    })


def images_read_per_rank(cfg: TrainConfig, ranks: int, n: int = 10_000) -> int:
    """Distinct images rank 0 reads and decodes for step 0 (the repeats of 3-Augment share one decode)."""
    repeats = cfg.augment.repeats if cfg.augment.three_augment else 1
    order = EpochOrder(n, 0)
    return len(share_keys(order, cfg.seed, 0, cfg.optim.batch_size, repeats=repeats, rank=0, world_size=ranks))


def pipeline_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int, ranks: int = 1) -> float:
    """Images/s (this rank's training positions) that rank 0 of `ranks` delivers."""
    from trainers.data import build_training_data

    source = build_training_data(cfg, device, rank=0, world_size=ranks)
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
    return steps * (cfg.optim.batch_size // ranks) / seconds


def trainer_throughput(cfg: TrainConfig, device: torch.device, steps: int, warmup: int, ranks: int = 1) -> float:
    """Images/s one worker's trainer takes at the per-worker batch (global batch / ranks)."""
    from trainers.loop import Trainer

    per_worker = cfg.optim.batch_size // ranks
    one = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"num_workers": 0}),
        "optim": cfg.optim.model_copy(update={"batch_size": per_worker}),
    })
    trainer = Trainer(one, device)
    batch = next(trainer.data.train_batches(0, per_worker))  # on the device; reused every step
    for step in range(warmup):
        trainer.train_step(batch)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    del trainer
    return steps * per_worker / seconds


def run_data_bench(settings: DataBenchSettings, device: torch.device) -> dict[str, Any]:
    ranks = settings.ranks
    if settings.spec is not None:
        ranks = spec_trial(settings.spec)[1]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = settings.root
        synthetic = root is None and not _spec_data_reachable(settings)
        if synthetic:
            tree = Path(tmp) / "imagefolder"
            write_synthetic_tree(tree, settings.images, settings.width, settings.height)
            root = str(tree)
            if settings.data == "shards":
                from trainers.data.shard_writer import write_shards

                write_shards(tree, Path(tmp) / "shards", shard_size=256)
                root = str(Path(tmp) / "shards")
        cfg = train_config(settings, root)
        if cfg.optim.batch_size % ranks:
            raise ValueError(f"the global batch {cfg.optim.batch_size} does not split evenly over {ranks} ranks")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        pipeline = pipeline_throughput(cfg, device, settings.steps, settings.warmup, ranks)
        trainer = trainer_throughput(cfg, device, settings.steps, settings.warmup, ranks)
    decode = cfg.data.decode if cfg.data.decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if cfg.data.name in ("imagefolder", "cifar10", "cifar100", "webdataset", "csv"):
        decode = "pil"  # PIL decode and transforms in the workers; shards decode with torchcodec
    if cfg.data.name == "shapes":
        decode = "generated"
    return {
        "benchmark": "data",
        "device": device_name(device),
        "config": {
            **asdict(settings), "data": cfg.data.name, "root": "synthetic" if synthetic else (root or "generated"),
            "decode": decode, "objective": cfg.objective, "batch": cfg.optim.batch_size, "size": cfg.model.label,
            "img": cfg.model.img_size, "patch": cfg.model.patch_size,
        },
        "ranks": ranks,
        "per_rank_batch": cfg.optim.batch_size // ranks,
        "images_read_per_rank_per_step": images_read_per_rank(cfg, ranks),
        "pipeline_imgs_per_s": pipeline,
        "trainer_imgs_per_s": trainer,
        "pipeline_over_trainer": pipeline / trainer,
        "input_bound": pipeline < trainer,
    }


def _spec_data_reachable(settings: DataBenchSettings) -> bool:
    """True when --spec's data can be read here (generated shapes, or a root that exists)."""
    if settings.spec is None:
        return False
    from trainers.data import check_data

    cfg, _ = spec_trial(settings.spec)
    if cfg.data.name == "shapes":
        return True
    try:
        check_data(cfg.data)
    except Exception:  # noqa: BLE001 - unreachable or unset: the bench measures synthetic shards instead
        return False
    return True


def format_data_result(r: dict[str, Any]) -> str:
    c = r["config"]
    ranks = r["ranks"]
    verdict = (
        f"input-bound: one worker's trainer could take {1 / r['pipeline_over_trainer']:.1f}x what one rank's pipeline delivers"
        if r["input_bound"]
        else f"not input-bound: one rank's pipeline delivers {r['pipeline_over_trainer']:.1f}x what one worker's trainer takes"
    )
    return "\n".join([
        f"device      {r['device']}",
        f"data        {c['data']} ({c['root']}), decode {DECODE_TEXT[c['decode']]}, {c['workers']} loader workers per rank",
        f"trial       objective {c['objective']}, global batch {c['batch']} over {ranks} rank(s): {r['per_rank_batch']} per rank,"
        f" {r['images_read_per_rank_per_step']} images read and decoded per rank per step",
        f"model       ViT-{c['size']}/{c['patch']} at {c['img']} px, {c['steps']} timed steps after {c['warmup']} warmup",
        f"pipeline    {r['pipeline_imgs_per_s']:10.1f} img/s   (one rank)",
        f"trainer     {r['trainer_imgs_per_s']:10.1f} img/s   (one worker, batch {r['per_rank_batch']})",
        verdict,
    ])
