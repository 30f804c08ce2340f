"""Class-labelled WebDataset shards (image + cls), local or s3://, read by step without a full copy.

Layout written by `python -m trainers.data.shards write IMAGEFOLDER OUT --shard-size N`:

    OUT/classes.json                  {"classes": [folder names], "names": [readable names]}
    OUT/train/shard-000000.tar        plain tar: 000000000.jpg, 000000000.cls, 000000001.jpg, ...
    OUT/train/shard-000000.tar.idx.json   byte offset and size of every image, and its label
    OUT/val/...                       the same for the val split

The index is written once per shard (tar_index.py), so a sample is one seek (local) or part of
a ranged GET (s3://, shard_store.py: many in flight per worker): no shard is downloaded whole
and nothing is mirrored to the node. Because any sample can be read by its number, the batch
for step s stays a pure function of (seed, s) (base.py) and resume is exact, local or s3://.

Training samples are random resized crops of the whole image (crops.py; 3-Augment and DINO
pass their crop plan, plain training RandomResizedCrop(img_size) + flip), evaluation samples
the central view. Decoding, data.decode:
    cpu   DataLoader workers decode (torchcodec, decode.py) and cut the crops (crops.resized_crop);
          uint8 crops go to the device and are normalised there (real.RealSource).
    gpu   workers read the bytes and draw the crops; the main process decodes the whole share
          with one torchcodec/nvJPEG call on the trainer's device and cuts every crop of the
          batch with one roi_align (crops.cut_crops). Images nvJPEG cannot take (PNG, WebP,
          CMYK JPEGs, ...) are decoded by the worker on the CPU, image by image.
    auto  gpu on a CUDA device, cpu otherwise.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .collate import Collate, Encoded, Views, uniforms_for
from .crops import CropPlan, eval_view, views_of_image
from .decode import decode_cpu, nvjpeg_decodable
from .layout import DatasetNotFoundError
from .sampling import SampleKey
from .shard_store import LocalShards, S3Shards, open_split, read_classes
from .tar_index import Member, write_index

INDEX_THREADS = 16


class ShardImages(Dataset[Any]):
    """Labelled samples of one split, read by SampleKey (index, seeds of its positions, or None
    for the evaluation view at img_size), a whole batch of keys at a time (`__getitems__`).

    decode_on_device=False: each sample is `Views`, decoded and cut in the worker.
    decode_on_device=True: each sample is `Encoded` (the bytes and the crop draws)."""

    def __init__(self, shards: LocalShards | S3Shards, *, img_size: int, plan: CropPlan, decode_on_device: bool) -> None:
        self.shards, self.img_size, self.plan, self.decode_on_device = shards, img_size, plan, decode_on_device
        self.names = shards.names()
        if not self.names:
            raise DatasetNotFoundError(f"shards: no *.tar shards in {shards.where}")
        self.items: list[tuple[int, Member, int]] = []
        # One small GET per shard on s3:// (ImageNet-1k at 1000 images a shard: about 1300): in parallel.
        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            for i, index in enumerate(pool.map(shards.index, self.names)):
                self.items += [(i, (offset, size), label) for _key, offset, size, label in index["samples"]]

    def __len__(self) -> int:
        return len(self.items)

    def encoded(self, index: int) -> tuple[torch.Tensor, int]:
        """The stored bytes of sample `index` and its label."""
        shard, member, label = self.items[index]
        return torch.frombuffer(bytearray(self.shards.read(self.names[shard], member)), dtype=torch.uint8), label

    def __getitems__(self, keys: Sequence[SampleKey]) -> list[Views | Encoded]:
        blobs = self.shards.read_many([(self.names[self.items[i][0]], self.items[i][1]) for i, _ in keys])
        return [self._sample(key, blob) for key, blob in zip(keys, blobs)]

    def __getitem__(self, key: SampleKey) -> Views | Encoded:
        return self.__getitems__([key])[0]

    def _sample(self, key: SampleKey, blob: bytes) -> Views | Encoded:
        index, seeds = key
        shard, member, label = self.items[index]
        name = f"{self.shards.where}/{self.names[shard]} at byte {member[0]}"
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        positions = len(seeds) if seeds is not None else 1
        uniforms = uniforms_for(self.plan, seeds) if seeds is not None else None
        if self.decode_on_device:
            # nvJPEG takes the JPEGs it can decode; the worker decodes the rest on the CPU, here.
            image = data if nvjpeg_decodable(blob) else decode_cpu(data, name)
            return Encoded(image, uniforms, label, positions, name)
        image = decode_cpu(data, name)
        if uniforms is None:
            return Views((eval_view(image, self.img_size).unsqueeze(0),), label, 1)
        return Views(views_of_image(image, self.plan, uniforms), label, positions)


def build_shards(
    root: str, *, img_size: int, seed: int, device: torch.device, num_workers: int, decode_mode: str,
    plan: CropPlan | None = None, rank: int = 0, world_size: int = 1,
) -> Any:
    """A RealSource over class-labelled shards at root (local folder or s3://).

    plan: the training crops (default RandomResizedCrop(img_size) + flip)."""
    from .real import IMAGENET_STATS, RealSource

    on_device = decode_mode == "gpu" or (decode_mode == "auto" and device.type == "cuda")
    plan = plan or CropPlan.single(img_size)
    classes = read_classes(root)

    def split(name: str) -> ShardImages:
        return ShardImages(open_split(root, name), img_size=img_size, plan=plan, decode_on_device=on_device)

    train = split("train")
    return RealSource(
        train, split("val"), num_classes=len(classes["classes"]), seed=seed, device=device, num_workers=num_workers,
        class_names=classes.get("names") or classes["classes"], reference=train, stats=IMAGENET_STATS,
        plan=plan, collate=Collate(plan, img_size), rank=rank, world_size=world_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .shard_writer import write_shards

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
