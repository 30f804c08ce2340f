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

from .collate import CaptionTokens, Collate
from .crops import CropPlan
from .layout import DatasetNotFoundError, class_dirs
from .real import WHOLE_IMAGE, RealSource, SeededSamples, _imagefolder_transforms, _TrainClassesFolder, readable_class_names
from .tar_index import BoundedFiles, Member, image_member, scan_members  # the tar index shared with labelled shards


def index_shard(path: Path) -> list[tuple[Member, Member]]:
    """(image, caption) members of every complete sample in one shard, in tar order."""
    pairs = []
    for members in scan_members(path).values():
        image = image_member(members)
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
        # At most OPEN_FILES shards open per process (LAION-style sets have many thousands of shards).
        self.files = BoundedFiles()

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, member: Member) -> bytes:
        return self.files.read(self.shards[shard], member)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        shard, image, text = self.items[index]
        picture = Image.open(io.BytesIO(self._read(shard, image))).convert("RGB")
        return self.transform(picture), self._read(shard, text).decode("utf-8").strip()


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
    num_workers: int, plan: CropPlan | None = None, context_length: int | None = None, rank: int = 0,
    world_size: int = 1,
) -> RealSource:
    """A RealSource whose training batches carry captions (and their tokens, made in the loader
    workers, when context_length is given); validation from the labelled val_root.

    plan: training crops cut from the whole image (DINO); None: RandomResizedCrop + flip."""
    train_tf, val_tf = _imagefolder_transforms(img_size)
    transform = WHOLE_IMAGE if plan is not None else train_tf
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
    tokens = CaptionTokens(context_length) if context_length else None
    return RealSource(
        SeededSamples(train, plan), SeededSamples(val), num_classes=len(classes), seed=seed, device=device,
        num_workers=num_workers, class_names=readable_class_names(val_root, classes), plan=plan,
        collate=Collate(plan, img_size, tokens), rank=rank, world_size=world_size,
    )
