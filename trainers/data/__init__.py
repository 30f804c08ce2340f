"""Data sources for the trainer: the generated 'shapes' set, CIFAR-10/100 and ImageFolder.

    check_data(cfg)                      cheap preflight before Ray starts
    build_data(cfg, img_size=, seed=, device=) -> DataSource

Every source yields step-addressed batches (see base.py): the batch for step s depends
only on (seed, s), so a resumed trial sees exactly the batches it would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DataConfig
from .layout import DatasetNotFoundError, check_local_layout, is_s3, required_children, resolve_root

if TYPE_CHECKING:
    import torch

    from .base import Batch, DataSource

__all__ = ["Batch", "DataSource", "DatasetNotFoundError", "build_data", "check_data"]


def __getattr__(name: str) -> Any:
    # torch loads only when a source is built: the sweep driver runs check_data in its
    # preflight and should not pay torch's import for it.
    if name in ("Batch", "DataSource"):
        from . import base

        return getattr(base, name)
    raise AttributeError(name)


def check_data(cfg: DataConfig) -> None:
    """Raise DatasetNotFoundError if a real data set is not where cfg.root says; no-op for 'shapes'."""
    if cfg.name == "shapes":
        return
    root = resolve_root(cfg)
    if is_s3(root):
        from .s3sync import check_s3_layout

        check_s3_layout(cfg.name, root, required_children(cfg.name))
    else:
        check_local_layout(cfg.name, Path(root))


def build_data(cfg: DataConfig, *, img_size: int, seed: int, device: "torch.device") -> "DataSource":
    """The data source that cfg names, yielding batches on `device`."""
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
        )
    root = resolve_root(cfg)
    if is_s3(root):
        from .s3sync import check_s3_layout, sync_prefix

        check_s3_layout(cfg.name, root, required_children(cfg.name))
        local = sync_prefix(root)
    else:
        local = Path(root)
    check_local_layout(cfg.name, local)
    from .real import build_real  # torchvision is imported only for real data

    return build_real(cfg.name, local, img_size=img_size, seed=seed, device=device, num_workers=cfg.num_workers)
