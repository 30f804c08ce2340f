"""Data sources for the trainer: the generated 'shapes' set (with captions), CIFAR-10/100,
ImageFolder, class-labelled shards (jpg + cls, local or s3:// read in place), and image-text pairs (WebDataset shards, CSV) for CLIP.

    check_data(cfg)                      cheap preflight before Ray starts
    build_data(cfg, img_size=, seed=, device=, crops=, context_length=, rank=, world_size=) -> DataSource
    build_training_data(train_cfg, device, rank=, world_size=)   the same, from a whole TrainConfig
    training_crops(train_cfg) -> CropPlan | None                  what the loader cuts (3-Augment, DINO)

Every source yields step-addressed batches (see base.py): the batch for step s depends
only on (seed, s), so a resumed trial sees exactly the batches it would have seen; with
world_size ranks, each rank reads, decodes and crops only its share of that batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DataConfig, TrainConfig
from .layout import IMAGE_TEXT, DatasetNotFoundError, check_local_layout, is_s3, required_children, resolve_root

if TYPE_CHECKING:
    import torch

    from .base import Batch, DataSource
    from .crops import CropPlan

__all__ = ["Batch", "DataSource", "DatasetNotFoundError", "build_data", "build_training_data", "check_data", "training_crops"]


def __getattr__(name: str) -> Any:
    # torch loads only when a source is built: the sweep driver runs check_data in its
    # preflight and should not pay torch's import for it.
    if name in ("Batch", "DataSource"):
        from . import base

        return getattr(base, name)
    raise AttributeError(name)


def check_data(cfg: DataConfig) -> None:
    """Raise DatasetNotFoundError if a real data set is not where cfg.root (and cfg.val_root)
    says; no-op for 'shapes'."""
    if cfg.name == "shapes":
        return
    for key, layout in (("root", cfg.name), ("val_root", "val_root")):
        if key == "val_root" and cfg.name not in IMAGE_TEXT:
            continue
        root = resolve_root(cfg, key)
        if is_s3(root):
            from .s3sync import check_s3_layout

            if layout == "csv":
                raise DatasetNotFoundError(f"csv: data.root must be a local file, not {root}")
            check_s3_layout(layout, root, required_children(layout))
        else:
            check_local_layout(layout, Path(root))


def _local(name: str, root: str) -> Path:
    """A local copy of the data at root: mirrored once per node when it is s3://."""
    if not is_s3(root):
        return Path(root)
    if name == "csv":
        raise DatasetNotFoundError(f"csv: data.root must be a local file, not {root}")
    from .s3sync import check_s3_layout, sync_prefix

    check_s3_layout(name, root, required_children(name))
    return sync_prefix(root)


def training_crops(cfg: TrainConfig) -> "CropPlan | None":
    """The random crops a training sample becomes, cut by the loader from the whole image:
    3-Augment's RandomResizedCrop (0.08-1, with its repeats), DINO's 2 global + N local crops;
    None: the source's usual training transform."""
    from .crops import CropGroup, CropPlan

    if cfg.objective == "dino":
        d = cfg.dino
        groups = [CropGroup(2, cfg.model.img_size, d.global_crop_scale)]
        if d.local_crops:
            groups.append(CropGroup(d.local_crops, d.local_crop_size, d.local_crop_scale))
        return CropPlan(tuple(groups))
    if cfg.augment.three_augment:
        return CropPlan.single(cfg.model.img_size, (0.08, 1.0), repeats=cfg.augment.repeats)
    return None


def build_training_data(cfg: TrainConfig, device: "torch.device", *, rank: int = 0, world_size: int = 1) -> "DataSource":
    """The trainer's data source: cfg's crops and caption tokens, this rank's share of each batch."""
    context = cfg.clip.context_length if cfg.objective == "clip" else None
    return build_data(
        cfg.data, img_size=cfg.model.img_size, seed=cfg.seed, device=device, crops=training_crops(cfg),
        context_length=context, rank=rank, world_size=world_size,
    )


def build_data(
    cfg: DataConfig, *, img_size: int, seed: int, device: "torch.device", crops: "CropPlan | None" = None,
    context_length: int | None = None, rank: int = 0, world_size: int = 1,
) -> "DataSource":
    """The data source that cfg names, yielding batches on `device`.

    crops: what each training image becomes (training_crops); context_length: tokenise captions
    in the loader (CLIP); rank, world_size: train_batches yields this rank's share only."""
    share = dict(rank=rank, world_size=world_size)
    tokens = None
    if context_length:
        from .collate import CaptionTokens

        tokens = CaptionTokens(context_length)
    if cfg.name == "shapes":
        from .shapes import ShapesSource

        return ShapesSource(
            num_classes=cfg.num_classes,
            train_size=cfg.train_size,
            val_size=cfg.val_size,
            img_size=img_size,
            seed=seed,
            device=device,
            kinds=cfg.shape_kinds,
            object_area=cfg.object_area,
            rotation=cfg.rotation,
            colours=cfg.colours,
            plan=crops,
            tokens=tokens,
            **share,
        )
    if cfg.name == "shards":
        # Read in place, local or s3:// (ranged GETs): no copy of the set on the node.
        from .shards import build_shards

        root = resolve_root(cfg)
        if not is_s3(root):
            check_local_layout(cfg.name, Path(root))
        return build_shards(
            root, img_size=img_size, seed=seed, device=device, num_workers=cfg.num_workers,
            decode_mode=cfg.decode, plan=crops, **share,
        )
    local = _local(cfg.name, resolve_root(cfg))
    check_local_layout(cfg.name, local)
    if cfg.name in IMAGE_TEXT:
        from .image_text import build_image_text

        val_local = _local("val_root", resolve_root(cfg, "val_root"))
        check_local_layout("val_root", val_local)
        return build_image_text(
            cfg.name, local, val_local, img_size=img_size, seed=seed, device=device,
            num_workers=cfg.num_workers, plan=crops, context_length=context_length, **share,
        )
    from .real import build_real  # torchvision is imported only for real data

    return build_real(
        cfg.name, local, img_size=img_size, seed=seed, device=device, num_workers=cfg.num_workers, plan=crops, **share
    )
