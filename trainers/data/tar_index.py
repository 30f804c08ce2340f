"""WebDataset tar shards, indexed: where every member's bytes are, so a sample is one seek or one
ranged GET. Shared by the class-labelled shards (shards.py) and CLIP's image-text shards.

    OUT/train/shard-000000.tar            plain tar: 000000000.jpg, 000000000.cls, 000000001.jpg, ...
    OUT/train/shard-000000.tar.idx.json   byte offset and size of every image, and its label
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "vit-shards/1"
OPEN_FILES = 64  # open local shard files per process, well below the usual limit of 1024
Member = tuple[int, int]  # (offset of the data in the tar file, size in bytes)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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


def image_member(members: dict[str, Member]) -> Member | None:
    return next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)


def index_labelled_shard(path: Path) -> dict[str, Any]:
    """The index of one local image + cls shard: every complete sample's image member and label."""
    samples = []
    with open(path, "rb") as f:
        for key, members in scan_members(f).items():
            image = image_member(members)
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


class BoundedFiles:
    """Open local files by path, at most `limit` at once (least recently used closed first).

    Random access touches every shard (ImageNet-1k: about 1,300): keeping them all open would
    pass the usual limit of 1,024 open files. Handles are per process: none travel to workers."""

    def __init__(self, limit: int = OPEN_FILES) -> None:
        self.limit = limit
        self._files: OrderedDict[Path, Any] = OrderedDict()

    def read(self, path: Path, member: Member) -> bytes:
        handle = self._files.get(path)
        if handle is None:
            if len(self._files) >= self.limit:
                self._files.popitem(last=False)[1].close()
            handle = self._files[path] = open(path, "rb")
        else:
            self._files.move_to_end(path)
        handle.seek(member[0])
        return handle.read(member[1])

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit, "_files": OrderedDict()}
