"""Tiny data sets in the real on-disk formats the shipped specs read, and their copies on S3.

- ImageFolder as ImageNet lays it out (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`, a
  `classnames.txt` for CLIP's zero-shot prompts), JPEGs of one coloured shape per class
  on a noisy background, so that the images differ and the classes can be told apart.
- WebDataset image-text shards (`shard-NNNN.tar` holding `KEY.jpg` + `KEY.txt`), the
  captions naming the colour and the shape, for CLIP.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# (ImageNet-style folder name, readable name, colour)
CLASSES = (
    ("n00000001", "red disc", (220, 40, 40)),
    ("n00000002", "green square", (40, 200, 60)),
    ("n00000003", "blue disc", (50, 70, 230)),
    ("n00000004", "yellow square", (230, 220, 40)),
)


def _image(index: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """One image of class `index`: its shape and colour at a random place on noise."""
    _, name, colour = CLASSES[index]
    width, height = size
    pixels = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    side = int(rng.integers(14, 22))
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    box = (x, y, x + side, y + side)
    if name.endswith("disc"):
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_imagefolder(root: Path, train_per_class: int = 12, val_per_class: int = 8, seed: int = 0) -> Path:
    """ImageNet's layout under root; val holds 8 per class, so a probe batch of 32 fits."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, (wnid, _, _) in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{wnid}_{i:04d}.JPEG").write_bytes(_jpeg(_image(index, rng)))
    names = "\n".join(name for _, name, _ in CLASSES) + "\n"
    (root / "classnames.txt").write_text(names)  # what ImageFolder's readable names come from
    (root / "val" / "classnames.txt").write_text(names)  # CLIP's zero-shot prompts read the val folder's
    return root


def write_image_text_shards(folder: Path, shards: int = 3, per_shard: int = 12, seed: int = 1) -> Path:
    """WebDataset tar shards of KEY.jpg + KEY.txt ("a photo of a red disc")."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                index = int(rng.integers(len(CLASSES)))
                key = f"{s:04d}{i:04d}"
                members = {f"{key}.jpg": _jpeg(_image(index, rng)), f"{key}.txt": f"a photo of a {CLASSES[index][1]}".encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def upload_tree(s3_client: Any, local: Path, bucket: str, prefix: str) -> str:
    """Copy a local tree to s3://bucket/prefix (the bucket is made if needed); returns the URL."""
    try:
        s3_client.create_bucket(Bucket=bucket)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"
