"""Where shards live: a local folder (reads are seeks) or an s3:// prefix (reads are ranged GETs).

`read_many` reads every member a loader worker needs for one batch. On s3:// a ranged GET
costs one round trip (20-50 ms to a region), so reading them one after the other caps a
worker at 20-50 images/s. Here they are in flight together: members of the same shard that
lie close together are coalesced into one ranged GET (at most COALESCE_GAP bytes wasted
between two, at most MAX_SPAN per GET), and the GETs run on READ_THREADS threads per
process. Memory stays bounded by one batch's bytes per worker (plus the coalesced gaps),
and the bytes come back in request order, so which samples a step reads, and so resume,
does not change.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from .layout import DatasetNotFoundError, is_s3
from .tar_index import INDEX_SUFFIX, BoundedFiles, Member, index_labelled_shard

CLASSES_FILE = "classes.json"
READ_THREADS = 32  # ranged GETs in flight per process (each DataLoader worker is one)
COALESCE_GAP = 64 * 1024  # bytes between two members that one GET may read through
MAX_SPAN = 8 * 1024 * 1024  # bytes one coalesced GET may cover at most

Request = tuple[str, Member]  # (shard name, member)


def coalesce(requests: Sequence[Request], gap: int | None = None, span: int | None = None) -> list[tuple[str, int, int, list[int]]]:
    """Ranged reads (shard, start, end exclusive, request numbers) covering every request:
    requests of one shard sorted by offset, neighbours merged while the gap and span allow
    (default COALESCE_GAP and MAX_SPAN)."""
    gap = COALESCE_GAP if gap is None else gap
    span = MAX_SPAN if span is None else span
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1][0]))
    runs: list[tuple[str, int, int, list[int]]] = []
    for i in order:
        name, (offset, size) = requests[i]
        if runs:
            last_name, start, end, members = runs[-1]
            if last_name == name and offset - end <= gap and max(end, offset + size) - start <= span:
                runs[-1] = (name, start, max(end, offset + size), members + [i])
                continue
        runs.append((name, offset, offset + size, [i]))
    return runs


class LocalShards:
    """Shards of one split in a local folder: reads are seeks, with a bounded set of open files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = BoundedFiles()

    @property
    def where(self) -> str:
        return str(self.folder)

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*.tar"))

    def index(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        listing = path.with_name(path.name + INDEX_SUFFIX)
        # Shards from another writer have no index: scan the tar headers (cheap, local).
        return json.loads(listing.read_text()) if listing.is_file() else index_labelled_shard(path)

    def read(self, name: str, member: Member) -> bytes:
        return self.files.read(self.folder / name, member)

    def read_many(self, requests: Sequence[Request]) -> list[bytes]:
        return [self.read(name, member) for name, member in requests]


class S3Shards:
    """Shards of one split under an s3:// prefix: ranged GETs, many in flight, never a whole shard.

    boto3 honours AWS_ENDPOINT_URL and the standard credential chain (as s3sync.py)."""

    def __init__(self, url: str) -> None:
        from .s3sync import parse_s3_url

        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(self.url)
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.bytes_fetched = 0  # of shard data, in this process
        self.gets = 0  # ranged GETs of shard data, in this process

    @property
    def where(self) -> str:
        return self.url

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # One connection per reading thread (botocore's pool holds 10 by default).
            self._client = boto3.client("s3", config=Config(max_pool_connections=READ_THREADS + 4))
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def names(self) -> list[str]:
        start = len(self.key(""))
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key("")):
            names += [o["Key"][start:] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        return sorted(names)

    def index(self, name: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name + INDEX_SUFFIX))["Body"].read()
        except ClientError as err:
            raise DatasetNotFoundError(
                f"shards: no index {self.url}/{name}{INDEX_SUFFIX}; write it with "
                "`python -m trainers.data.shards index LOCAL_DIR` before uploading"
            ) from err
        return json.loads(body)

    def _get(self, name: str, start: int, end: int) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes={start}-{end - 1}")
        return response["Body"].read()

    def read(self, name: str, member: Member) -> bytes:
        """One member, one blocking ranged GET (the reader before read_many; kept for single reads)."""
        offset, size = member
        data = self._get(name, offset, offset + size)
        self.bytes_fetched, self.gets = self.bytes_fetched + len(data), self.gets + 1
        return data

    def read_many(self, requests: Sequence[Request]) -> list[bytes]:
        """The members' bytes in request order, by coalesced ranged GETs on READ_THREADS threads."""
        runs = coalesce(requests)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="s3-read")
        _ = self.client  # one client, made before the threads share it (boto3 clients are thread-safe)
        blobs = list(self._pool.map(lambda run: self._get(run[0], run[1], run[2]), runs))
        self.bytes_fetched, self.gets = self.bytes_fetched + sum(map(len, blobs)), self.gets + len(runs)
        out: list[bytes] = [b""] * len(requests)
        for (name, start, _end, members), blob in zip(runs, blobs):
            view = memoryview(blob)
            for i in members:
                offset, size = requests[i][1]
                out[i] = bytes(view[offset - start : offset - start + size])
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_pool": None}  # a boto3 client and threads per process


def open_split(root: str, split: str) -> LocalShards | S3Shards:
    return S3Shards(f"{root.rstrip('/')}/{split}") if is_s3(root) else LocalShards(Path(root) / split)


def read_classes(root: str) -> dict[str, list[str]]:
    if is_s3(root):
        shards = S3Shards(root)
        body = shards.client.get_object(Bucket=shards.bucket, Key=shards.key(CLASSES_FILE))["Body"].read()
        return json.loads(body)
    return json.loads((Path(root) / CLASSES_FILE).read_text())
