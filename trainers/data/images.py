"""Images for probing a pretrained model: a folder of images, an ImageFolder root, a tar shard,
an s3:// prefix, or the generated 'shapes', resized and normalised as the model expects.

    load_images(source, img_size=, mean=, std=, crop_pct=, probe_size=, search_size=) -> ImageSet

The probe batch is the first `probe_size` images of a fixed order (a seeded shuffle, so an
ImageFolder's classes are mixed); the images for the register-neuron search are the next
`search_size`, disjoint from the probe batch when the source has enough of them.

* folder: every image file below it (recursively); the first-level sub-folder names the
  class when there are several, else every label is 0;
* ImageFolder root (train/ and val/ with class folders): the val split;
* tar shard (WebDataset layout, `key.jpg` with an optional `key.cls` holding the label);
* s3://bucket/prefix: synced once to the node-local cache (trainers/data/s3sync.py), then
  read as a folder;
* `shapes`: the generated data set at the model's size, with masks, so the dense probes run.
"""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Batch
from .layout import DatasetNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SHAPES = "shapes"
SHAPES_CLASSES = 6


@dataclass
class ImageSet:
    probe: Batch  # the probe batch (images normalised for the model; masks for shapes)
    search: torch.Tensor  # [M, 3, H, W] images for the register-neuron search
    description: str  # one line for the report: what was read and how many

    @property
    def search_overlaps_probe(self) -> bool:
        return self.description.endswith("(search reuses probe images)")


def load_images(
    source: str,
    *,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 1.0,
    probe_size: int = 32,
    search_size: int = 64,
    seed: int = 0,
) -> ImageSet:
    """Read `probe_size + search_size` images from `source` (see the module docstring)."""
    if source == SHAPES:
        return _shapes(img_size, mean, std, probe_size, search_size, seed)
    samples, what = _samples(source)
    if len(samples) < 4:
        raise DatasetNotFoundError(f"{source}: {len(samples)} images found; the probes need at least 4")
    random.Random(seed).shuffle(samples)
    transform = eval_transform(img_size, mean, std, crop_pct)
    probe_n = min(probe_size, len(samples))
    rest = samples[probe_n : probe_n + search_size]
    overlap = len(rest) == 0
    picked = samples[:probe_n] + (rest or samples[:search_size])
    images = torch.stack([transform(_open(ref)) for ref, _ in picked])
    labels = torch.tensor([label for _, label in picked[:probe_n]], dtype=torch.int64)
    note = f"{what}: {len(samples)} images, probe batch {probe_n}, search {len(picked) - probe_n}"
    return ImageSet(Batch(images[:probe_n], labels), images[probe_n:], note + (" (search reuses probe images)" if overlap else ""))


def check_source(source: str) -> str:
    """Raise DatasetNotFoundError unless `source` has images to read (cheap: lists files, decodes none)."""
    if source == SHAPES:
        return "shapes (generated)"
    samples, what = _samples(source)
    if len(samples) < 4:
        raise DatasetNotFoundError(f"{source}: {len(samples)} images found; the probes need at least 4")
    return f"{what}: {len(samples)} images"


def eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 1.0):
    """timm's evaluation transform: resize the short side to img_size / crop_pct, centre crop, normalise."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _shapes(img_size: int, mean, std, probe_size: int, search_size: int, seed: int) -> ImageSet:
    from .shapes import ShapesSource

    source = ShapesSource(
        num_classes=SHAPES_CLASSES, train_size=1, val_size=probe_size + search_size, img_size=img_size, seed=seed,
        device=torch.device("cpu"),
    )
    batch = source.val_images(0, probe_size + search_size, normalise=False)  # 0..1 RGB
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (batch.images - m) / s
    probe = Batch(images[:probe_size], batch.labels[:probe_size], batch.masks[:probe_size])  # type: ignore[index]
    return ImageSet(probe, images[probe_size:], f"shapes (generated, seed {seed}): probe batch {probe_size}, search {search_size}")


ImageRef = tuple[Path, str] | Path  # (tar file, member name) or an image file


def _samples(source: str) -> tuple[list[tuple[ImageRef, int]], str]:
    root_text = source
    if source.startswith("s3://"):
        from .s3sync import sync_prefix

        root_text = str(sync_prefix(source))
    root = Path(root_text).expanduser()
    if root.is_file() and tarfile.is_tarfile(root):
        return _tar_samples(root), f"tar shard {source}"
    if not root.is_dir():
        raise DatasetNotFoundError(f"{source}: no such folder or tar file (give an image folder, an ImageFolder root, a .tar shard, s3://... or 'shapes')")
    if (root / "val").is_dir() and (root / "train").is_dir():
        root, what = root / "val", f"ImageFolder {source} (val split)"
    else:
        what = f"folder {source}"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[ImageRef, int]] = [
        (p, index.get(p.relative_to(root).parts[0], 0) if len(classes) > 1 else 0) for p in files
    ]
    if not samples:
        raise DatasetNotFoundError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) below {root}")
    return samples, what + (f", {len(classes)} classes" if len(classes) > 1 else "")


def _tar_samples(path: Path) -> list[tuple[ImageRef, int]]:
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        samples: list[tuple[ImageRef, int]] = []
        for name in sorted(members):
            stem, dot, suffix = name.rpartition(".")
            if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
                label_member = members.get(f"{stem}.cls")
                label = int(tar.extractfile(label_member).read().decode().strip()) if label_member else 0  # type: ignore[union-attr]
                samples.append(((path, name), label))
    if not samples:
        raise DatasetNotFoundError(f"{path}: the tar shard holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def _open(ref: ImageRef):
    """The image as RGB, read fully (no file handle stays open)."""
    from PIL import Image

    if isinstance(ref, tuple):
        path, member = ref
        with tarfile.open(path) as tar:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        ref = io.BytesIO(data)  # type: ignore[assignment]
    with Image.open(ref) as image:
        return image.convert("RGB")
