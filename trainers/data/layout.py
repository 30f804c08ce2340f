"""Where a real data set lives and what must be there: root expansion and layout checks.

These checks are cheap (a few stat/listdir calls, never a walk over all images), so the
orchestrator can run them before Ray starts and fail with one message that names the
data set, the path and what was expected there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import DataConfig


class DatasetNotFoundError(FileNotFoundError):
    """A real data set is missing or laid out wrongly; the message says where and what was expected."""


# What torchvision's CIFAR loaders read (torchvision.datasets.CIFAR10/100, download=False).
CIFAR_FILES: dict[str, tuple[str, list[str]]] = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
    ),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
HINTS = {
    "cifar10": "put torchvision's CIFAR-10 python files there (cifar-10-python.tar.gz, extracted)",
    "cifar100": "put torchvision's CIFAR-100 python files there (cifar-100-python.tar.gz, extracted)",
    "imagefolder": "expected the ImageNet layout: train/<class>/*.jpg and val/<class>/*.jpg",
    "shards": "expected class-labelled shards (python -m trainers.data.shards write): classes.json, train/*.tar, val/*.tar",
    "webdataset": "expected WebDataset shards: *.tar files whose samples pair a .jpg with a .txt caption",
    "csv": "expected a CSV file with 'image' and 'caption' columns (image paths relative to the file)",
    "val_root": "expected labelled validation images in ImageFolder layout: <class>/*.jpg",
}
IMAGE_TEXT = ("webdataset", "csv")


def required_children(name: str) -> list[str]:
    """Top-level entries of the data set's root that must exist (also used for s3 prefixes)."""
    if name in IMAGE_TEXT or name == "val_root":
        return [""]  # anything under the root: shards, or class folders
    return [CIFAR_FILES[name][0]] if name in CIFAR_FILES else ["train", "val"]


def resolve_root(cfg: DataConfig, key: str = "root") -> str:
    """cfg.root (or cfg.val_root) with ${ENV_VAR} expanded; an unset variable is an error that names it."""
    raw = getattr(cfg, key)
    if raw is None:
        raise DatasetNotFoundError(f"{cfg.name}: data.{key} is not set; {HINTS[cfg.name if key == 'root' else key]}")
    root = os.path.expandvars(raw)
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", root)
    if unset:
        raise DatasetNotFoundError(
            f"{cfg.name}: data.{key} {raw!r} uses environment variable {unset[0]}, which is not set"
        )
    return root if is_s3(root) else str(Path(root).expanduser())


def is_s3(root: str) -> bool:
    return root.startswith("s3://")


def class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def check_local_layout(name: str, root: Path) -> None:
    """Raise DatasetNotFoundError unless `root` holds data set `name` in the expected layout."""
    if name == "csv":
        if not root.is_file():
            raise DatasetNotFoundError(f"csv: no file {root}; {HINTS[name]}")
        return
    if name == "val_root":
        if not root.is_dir() or not class_dirs(root):
            raise DatasetNotFoundError(f"data.val_root: no class directories in {root}; {HINTS[name]}")
        return
    if not root.is_dir():
        raise DatasetNotFoundError(f"{name}: no directory {root}; {HINTS[name]}")
    if name in CIFAR_FILES:
        folder, files = CIFAR_FILES[name]
        if not (root / folder).is_dir():
            raise DatasetNotFoundError(f"{name}: no {folder!r} under {root}; {HINTS[name]}")
        missing = [f for f in files if not (root / folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(f"{name}: missing {', '.join(missing)} in {root / folder}; {HINTS[name]}")
        return
    if name == "shards":
        for split in ("train", "val"):
            if next((root / split).rglob("*.tar"), None) is None:
                raise DatasetNotFoundError(f"shards: no *.tar shards under {root / split}; {HINTS[name]}")
        if not (root / "classes.json").is_file():
            raise DatasetNotFoundError(f"shards: no classes.json in {root}; {HINTS[name]}")
        return
    if name == "webdataset":
        if next(root.rglob("*.tar"), None) is None:
            raise DatasetNotFoundError(f"webdataset: no *.tar shards under {root}; {HINTS[name]}")
        return
    classes = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetNotFoundError(f"{name}: no {split!r} directory under {root}; {HINTS[name]}")
        classes[split] = class_dirs(root / split)
        if not classes[split]:
            raise DatasetNotFoundError(f"{name}: no class directories in {root / split}; {HINTS[name]}")
    unknown = sorted(set(classes["val"]) - set(classes["train"]))
    if unknown:
        raise DatasetNotFoundError(
            f"{name}: {root / 'val'} has classes that {root / 'train'} lacks: {', '.join(unknown[:5])}"
        )
