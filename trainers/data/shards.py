"""Class-labelled WebDataset shards (jpg + cls), local or s3://, read by step without a full copy.

Layout written by `python -m trainers.data.shards write IMAGEFOLDER OUT --shard-size N`:

    OUT/classes.json                  {"classes": [folder names], "names": [readable names]}
    OUT/train/shard-000000.tar        plain tar: 000000000.jpg, 000000000.cls, 000000001.jpg, ...
    OUT/train/shard-000000.tar.idx.json   byte offset and size of every jpg, and its label
    OUT/val/...                       the same for the val split

The index is written once per shard, so a sample is one seek (local) or one ranged GET
(s3://, `Range: bytes=a-b`): no shard is ever downloaded whole and nothing is mirrored to
the node. Because any sample can be read by its number, the batch for step s stays a pure
function of (seed, s) (base.py) and resume is exact, local or s3://.

Images travel as JPEG bytes or uint8 and are normalised on the device (real.RealSource).
Decoding, data.decode:
    cpu   DataLoader workers decode (torchvision.io.decode_jpeg, no PIL) and crop/resize with
          torch ops; uint8 batches go to the device.
    gpu   workers only read bytes; the main process decodes the whole batch with
          torchvision's batched decode_jpeg(list, device=<trainer device>) (nvJPEG on CUDA)
          and crops/resizes there with the same functions as the cpu path.
    auto  gpu on a CUDA device, cpu otherwise.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .layout import DatasetNotFoundError, class_dirs, is_s3

INDEX_SUFFIX = ".idx.json"
CLASSES_FILE = "classes.json"
INDEX_FORMAT = "vit-shards/1"
INDEX_THREADS = 16
OPEN_SHARDS = 64  # open local shard files per process
Member = tuple[int, int]  # (offset of the data in the tar file, size in bytes)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------- tar indexing


def split_key(name: str) -> tuple[str, str]:
    """(key, extension): WebDataset's rule, the key is the path up to the first dot of the file name."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def scan_members(tar_file: Any) -> dict[str, dict[str, Member]]:
    """{key: {extension: (offset, size)}} of every file in an uncompressed tar, in tar order
    (tar headers only; the data is not read)."""
    samples: dict[str, dict[str, Member]] = {}
    # Uncompressed tar only ("r:"): the data offsets must be seekable.
    opened = tarfile.open(tar_file, "r:") if isinstance(tar_file, (str, Path)) else tarfile.open(fileobj=tar_file, mode="r:")
    with opened as tar:
        for info in tar:
            if not info.isfile() or "." not in Path(info.name).name:
                continue
            key, ext = split_key(info.name)
            samples.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
    return samples


def index_labelled_shard(path: Path) -> dict[str, Any]:
    """The index of one local jpg + cls shard: every complete sample's image member and label."""
    samples = []
    with open(path, "rb") as f:
        for key, members in scan_members(f).items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None or "cls" not in members:
                continue
            f.seek(members["cls"][0])
            label = int(f.read(members["cls"][1]).decode().strip())
            samples.append([key, image[0], image[1], label])
    return {"format": INDEX_FORMAT, "samples": samples}


def write_index(path: Path) -> Path:
    target = path.with_name(path.name + INDEX_SUFFIX)
    target.write_text(json.dumps(index_labelled_shard(path)))
    return target


# ----------------------------------------------------------------------------- where shards live


class LocalShards:
    """Shards of one split in a local folder: reads are seeks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: OrderedDict[str, Any] = OrderedDict()  # least recently used first

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*.tar"))

    def index(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        listing = path.with_name(path.name + INDEX_SUFFIX)
        # Shards from another writer have no index: scan the tar headers (cheap, local).
        return json.loads(listing.read_text()) if listing.is_file() else index_labelled_shard(path)

    def read(self, name: str, member: Member) -> bytes:
        handle = self._files.get(name)
        if handle is None:
            # Random access touches every shard (ImageNet-1k: about 1300): keep a bounded set open
            # per process, below the usual limit of 1024 open files.
            if len(self._files) >= OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            handle = self._files[name] = open(self.folder / name, "rb")
        else:
            self._files.move_to_end(name)
        handle.seek(member[0])
        return handle.read(member[1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}  # file handles do not travel to worker processes


class S3Shards:
    """Shards of one split under an s3:// prefix: each sample is one ranged GET, never the whole shard.

    boto3 honours AWS_ENDPOINT_URL and the standard credential chain (as s3sync.py)."""

    def __init__(self, url: str) -> None:
        from .s3sync import parse_s3_url

        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(self.url)
        self._client: Any = None
        self.bytes_fetched = 0  # of shard data, in this process

    @property
    def client(self) -> Any:
        if self._client is None:
            from .s3sync import _client

            self._client = _client()
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def names(self) -> list[str]:
        start = len(self._key(""))
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key("")):
            names += [o["Key"][start:] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        return sorted(names)

    def index(self, name: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name + INDEX_SUFFIX))["Body"].read()
        except ClientError as err:
            raise DatasetNotFoundError(
                f"shards: no index {self.url}/{name}{INDEX_SUFFIX}; write it with "
                "`python -m trainers.data.shards index LOCAL_DIR` before uploading"
            ) from err
        return json.loads(body)

    def read(self, name: str, member: Member) -> bytes:
        offset, size = member
        response = self.client.get_object(
            Bucket=self.bucket, Key=self._key(name), Range=f"bytes={offset}-{offset + size - 1}"
        )
        data = response["Body"].read()
        self.bytes_fetched += len(data)
        return data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # a boto3 client per process


def open_split(root: str, split: str) -> LocalShards | S3Shards:
    return S3Shards(f"{root.rstrip('/')}/{split}") if is_s3(root) else LocalShards(Path(root) / split)


def read_classes(root: str) -> dict[str, list[str]]:
    if is_s3(root):
        shards = S3Shards(root)
        body = shards.client.get_object(Bucket=shards.bucket, Key=shards._key(CLASSES_FILE))["Body"].read()
        return json.loads(body)
    return json.loads((Path(root) / CLASSES_FILE).read_text())


# ----------------------------------------------------------------------------- decode and crop (any device)


def decode(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images from JPEG bytes (1-D uint8 CPU tensors), decoded on `device`.

    On CUDA this is one batched nvJPEG call (torchvision >= 0.19 takes a list); on the CPU
    libjpeg-turbo, image by image, in whichever process calls it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
    return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]


def random_resized_crop_box(
    height: int, width: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawn from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: a central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, *size], bilinear with antialiasing (as torchvision's Resize)."""
    x = F.interpolate(image.unsqueeze(0).float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def train_view(image: torch.Tensor, seed: int, img_size: int) -> torch.Tensor:
    """RandomResizedCrop(img_size) + horizontal flip, the randomness drawn from `seed` on the CPU,
    so the view is the same on every device and in every process."""
    generator = torch.Generator().manual_seed(seed)
    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
    out = resize(image[:, top : top + h, left : left + w], (img_size, img_size))
    return out.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else out


def eval_view(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize the shorter side to img_size / 0.875, then a central img_size crop (ImageNet eval)."""
    height, width = image.shape[-2:]
    short = round(img_size / 0.875)
    scale = short / min(height, width)
    size = (max(short, int(height * scale)), max(short, int(width * scale)))
    out = resize(image, size)
    top, left = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    return out[:, top : top + img_size, left : left + img_size]


def view(image: torch.Tensor, seed: int | None, img_size: int) -> torch.Tensor:
    """The training view under `seed`, or the evaluation view where seed is None."""
    return eval_view(image, img_size) if seed is None else train_view(image, seed, img_size)


@dataclass
class EncodedBatch:
    """What the loader hands over when decoding happens on the device: JPEG bytes, and per image
    its augmentation seed (None: the evaluation view)."""

    data: list[torch.Tensor]
    seeds: list[int | None]

    def pin_memory(self) -> "EncodedBatch":
        return self  # decode_jpeg copies the bytes itself

    def decode(self, device: torch.device, img_size: int) -> torch.Tensor:
        return torch.stack([view(i, s, img_size) for i, s in zip(decode(self.data, device), self.seeds)])


# ----------------------------------------------------------------------------- the data set


class ShardImages(Dataset[Any]):
    """Labelled samples of one split, indexed by (index, augmentation seed) as real.SeededSamples.

    decode_on_device=False: returns (uint8 [3, S, S] view, label), decoded in the worker.
    decode_on_device=True: returns (JPEG bytes, label, seed or None); collate() makes an EncodedBatch."""

    def __init__(self, shards: LocalShards | S3Shards, *, img_size: int, train: bool, decode_on_device: bool) -> None:
        self.shards, self.img_size, self.train, self.decode_on_device = shards, img_size, train, decode_on_device
        self.names = shards.names()
        if not self.names:
            raise DatasetNotFoundError(f"shards: no *.tar shards in {getattr(shards, 'url', None) or shards.folder}")
        self.items: list[tuple[int, Member, int]] = []
        # One small GET per shard on s3:// (ImageNet-1k at 1000 images a shard: about 1300): in parallel.
        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            for i, index in enumerate(pool.map(shards.index, self.names)):
                self.items += [(i, (offset, size), label) for _key, offset, size, label in index["samples"]]

    def __len__(self) -> int:
        return len(self.items)

    def encoded(self, index: int) -> tuple[torch.Tensor, int]:
        shard, member, label = self.items[index]
        return torch.frombuffer(bytearray(self.shards.read(self.names[shard], member)), dtype=torch.uint8), label

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        data, label = self.encoded(index)
        sample_seed = seed if self.train else None
        if self.decode_on_device:
            return data, label, sample_seed
        return view(decode([data], torch.device("cpu"))[0], sample_seed, self.img_size), label


def collate(samples: list[Any]) -> Any:
    """(uint8 images or EncodedBatch, int64 labels) from ShardImages samples of either kind."""
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    if len(samples[0]) == 3:
        return EncodedBatch([s[0] for s in samples], [s[2] for s in samples]), labels
    return torch.stack([s[0] for s in samples]), labels


def build_shards(
    root: str, *, img_size: int, seed: int, device: torch.device, num_workers: int, decode_mode: str,
    augment: bool = True,
) -> Any:
    """A RealSource over class-labelled shards at root (local folder or s3://)."""
    from .real import IMAGENET_STATS, RealSource

    on_device = decode_mode == "gpu" or (decode_mode == "auto" and device.type == "cuda")
    classes = read_classes(root)

    def split(name: str, train: bool) -> ShardImages:
        return ShardImages(open_split(root, name), img_size=img_size, train=train, decode_on_device=on_device)

    train, val = split("train", augment), split("val", False)
    reference = copy.copy(train)  # the same index and reader, without augmentation
    reference.train = False
    return RealSource(
        train, val, num_classes=len(classes["classes"]), seed=seed, device=device, num_workers=num_workers,
        class_names=classes.get("names") or classes["classes"], reference=reference, stats=IMAGENET_STATS,
        seeded=False, collate=collate, img_size=img_size,
    )


# ----------------------------------------------------------------------------- the writer


def _jpeg_bytes(path: Path) -> bytes:
    """The file's bytes if it is a JPEG already (kept bit for bit), else re-encoded at quality 95."""
    data = path.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same tree gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(source: Path, out: Path, shard_size: int) -> dict[str, int]:
    """Write train/ and val/ of an ImageFolder tree as jpg + cls shards with an index each.
    Class indices follow the sorted train folders (as the ImageFolder loader). Returns images per split."""
    from .real import readable_class_names

    if shard_size < 1:
        raise ValueError(f"--shard-size must be 1 or more, got {shard_size}")
    classes = class_dirs(source / "train")
    label_of = {c: i for i, c in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        files = [
            (p, label_of[c])
            for c in class_dirs(source / split)
            for p in sorted((source / split / c).iterdir())
            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        ]
        (out / split).mkdir(exist_ok=True)
        for start in range(0, len(files), shard_size):
            path = out / split / f"shard-{start // shard_size:06d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for n, (image, label) in enumerate(files[start : start + shard_size], start):
                    _add(tar, f"{n:09d}.jpg", _jpeg_bytes(image))
                    _add(tar, f"{n:09d}.cls", str(label).encode())
            write_index(path)
        counts[split] = len(files)
    (out / CLASSES_FILE).write_text(json.dumps({"classes": classes, "names": readable_class_names(source, classes)}))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write jpg + cls shards (and their indexes) from an ImageFolder tree")
    write.add_argument("imagefolder", type=Path, help="a folder with train/<class>/*.jpg and val/<class>/*.jpg")
    write.add_argument("out", type=Path, help="output folder (upload it as is to use it from s3://)")
    write.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    index = sub.add_parser("index", help="write the index of every *.tar under a folder (shards from other writers)")
    index.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        counts = write_shards(args.imagefolder, args.out, args.shard_size)
        print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    else:
        paths = sorted(args.folder.rglob("*.tar"))
        for path in paths:
            write_index(path)
        print(f"indexed {len(paths)} shards under {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
