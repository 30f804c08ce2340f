"""Writing class-labelled shards from an ImageFolder tree (`python -m trainers.data.shards write`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from .layout import class_dirs
from .shard_store import CLASSES_FILE
from .tar_index import IMAGE_EXTENSIONS, write_index


def jpeg_bytes(path: Path) -> bytes:
    """The file's bytes if it is a JPEG already (kept bit for bit), else re-encoded at quality 95."""
    data = path.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
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
                    add_member(tar, f"{n:09d}.jpg", jpeg_bytes(image))
                    add_member(tar, f"{n:09d}.cls", str(label).encode())
            write_index(path)
        counts[split] = len(files)
    (out / CLASSES_FILE).write_text(json.dumps({"classes": classes, "names": readable_class_names(source, classes)}))
    return counts
