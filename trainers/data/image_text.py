"""Image-text pairs for CLIP: WebDataset shards (jpg + txt) and a CSV of (image path, caption).

WebDataset shards are plain tar files whose members are grouped by key: `0001.jpg` and
`0001.txt` are one sample. We index every shard's members once (tar headers only: the offset
and size of each file) and read samples by seeking, so the data set is map-style and every
step's batch is a pure function of (seed, step), as for the other sources (base.py): a
resumed trial sees the same pairs. s3:// shards are mirrored to the node's cache first
(s3sync.py). Evaluation and probes need labels, so both formats take a labelled validation
folder (ImageFolder layout, `data.val_root`); its class names make the zero-shot prompts.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from .layout import DatasetNotFoundError, class_dirs
from .real import RealSource, _imagefolder_transforms, _TrainClassesFolder, readable_class_names
from .shards import IMAGE_EXTENSIONS, Member, scan_members  # the tar index shared with labelled shards


def index_shard(path: Path) -> list[tuple[Member, Member]]:
    """(image, caption) members of every complete sample in one shard, in tar order."""
    pairs = []
    for members in scan_members(path).values():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is not None and "txt" in members:
            pairs.append((image, members["txt"]))
    return pairs


class ShardPairs(Dataset[tuple[Any, str]]):
    """(transformed image, caption) from indexed WebDataset shards."""

    def __init__(self, shards: list[Path], transform: Callable[..., Any]) -> None:
        self.transform = transform
        self.shards = shards
        self.items: list[tuple[int, Member, Member]] = [
            (i, image, text) for i, shard in enumerate(shards) for image, text in index_shard(shard)
        ]
        self._files: dict[int, Any] = {}  # open per process: DataLoader workers each get their own

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, member: Member) -> bytes:
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(self.shards[shard], "rb")
        handle.seek(member[0])
        return handle.read(member[1])

    def __getitem__(self, index: int) -> tuple[Any, str]:
        shard, image, text = self.items[index]
        picture = Image.open(io.BytesIO(self._read(shard, image))).convert("RGB")
        return self.transform(picture), self._read(shard, text).decode("utf-8").strip()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}  # file handles do not travel to worker processes


class CsvPairs(Dataset[tuple[Any, str]]):
    """(transformed image, caption) from a CSV with an 'image' and a 'caption' column; image
    paths are relative to the CSV's folder unless absolute."""

    def __init__(self, path: Path, transform: Callable[..., Any]) -> None:
        self.transform = transform
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetNotFoundError(f"csv: {path} needs a header with 'image' and 'caption' columns")
            self.rows = [(path.parent / row["image"], row["caption"]) for row in reader]
        if not self.rows:
            raise DatasetNotFoundError(f"csv: {path} has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        image, caption = self.rows[index]
        return self.transform(Image.open(image).convert("RGB")), caption


def build_image_text(
    name: str, root: Path, val_root: Path, *, img_size: int, seed: int, device: torch.device,
    num_workers: int, augment: bool = True,
) -> RealSource:
    """A RealSource whose training batches carry captions; validation from the labelled val_root."""
    train_tf, val_tf = _imagefolder_transforms(img_size)
    transform = train_tf if augment else val_tf
    if name == "webdataset":
        shards = sorted(root.rglob("*.tar"))
        if not shards:
            raise DatasetNotFoundError(f"webdataset: no *.tar shards under {root}")
        train: Dataset[tuple[Any, str]] = ShardPairs(shards, transform)
    elif name == "csv":
        train = CsvPairs(root, transform)
    else:
        raise ValueError(f"unknown image-text data set {name!r}")
    if len(train) == 0:  # type: ignore[arg-type]
        raise DatasetNotFoundError(f"{name}: no image-text pairs in {root}")
    classes = class_dirs(val_root)
    val = _TrainClassesFolder(val_root, classes, val_tf, allow_empty=True)
    return RealSource(
        train, val, num_classes=len(classes), seed=seed, device=device, num_workers=num_workers,
        class_names=readable_class_names(val_root, classes),
    )
