"""s3:// data roots: a cheap existence check, and a one-time sync to a node-local cache.

boto3 uses the standard credential chain and honours AWS_ENDPOINT_URL (S3-compatible
stores such as MinIO). The cache lives under $VIT_DATA_CACHE (default
~/.cache/vit-registers/)/<bucket>/<prefix>. A file lock serialises trials on one node:
the first one downloads, the others wait and then find the completion marker. An
interrupted sync resumes: files already present with the right size are skipped.
Delete the marker file to force a re-sync after the bucket changed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .layout import HINTS, DatasetNotFoundError

SYNC_MARKER = ".vit-sync-complete"
DOWNLOAD_THREADS = 16


def parse_s3_url(url: str) -> tuple[str, str]:
    """('bucket', 'some/prefix') from 's3://bucket/some/prefix/' (prefix without slashes at the ends)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"not an s3 URL with a bucket: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def cache_dir_for(url: str) -> Path:
    bucket, prefix = parse_s3_url(url)
    base = Path(os.environ.get("VIT_DATA_CACHE") or "~/.cache/vit-registers/").expanduser()
    return base / bucket / prefix if prefix else base / bucket


def _client() -> Any:
    import boto3  # imported here so that the shapes data set never needs boto3

    return boto3.client("s3")


def _key_prefix(prefix: str, child: str = "") -> str:
    return "/".join(p for p in (prefix, child) if p) + "/" if (prefix or child) else ""


def check_s3_layout(name: str, url: str, children: list[str]) -> None:
    """Raise DatasetNotFoundError unless every `child` of the URL holds at least one object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    client = _client()
    for child in children:
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=_key_prefix(prefix, child), MaxKeys=1)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "error")
            raise DatasetNotFoundError(
                f"{name}: cannot list {url} ({code}); check the bucket name and credentials"
            ) from err
        except BotoCoreError as err:
            raise DatasetNotFoundError(f"{name}: cannot reach {url}: {err}") from err
        if listing.get("KeyCount", 0) == 0:
            raise DatasetNotFoundError(f"{name}: no objects under {url.rstrip('/')}/{child}/; {HINTS[name]}")


def sync_prefix(url: str) -> Path:
    """Mirror every object under the URL into the local cache once; return the local directory."""
    from filelock import FileLock

    bucket, prefix = parse_s3_url(url)
    dest = cache_dir_for(url)
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / SYNC_MARKER).exists():
            return dest
        client = _client()
        key_prefix = _key_prefix(prefix)
        todo: list[tuple[str, Path]] = []
        seen = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(key_prefix) :]
                if not relative or relative.endswith("/"):
                    continue  # "directory" marker objects
                local = (dest / relative).resolve()
                if not local.is_relative_to(dest.resolve()):
                    raise ValueError(f"object key {obj['Key']!r} in {url} escapes the cache directory")
                seen += 1
                if not (local.is_file() and local.stat().st_size == obj["Size"]):
                    todo.append((obj["Key"], local))
        if seen == 0:
            raise DatasetNotFoundError(f"no objects under {url}")

        def download(item: tuple[str, Path]) -> None:
            key, local = item
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")
            client.download_file(bucket, key, str(partial))
            os.replace(partial, local)  # a file is complete or absent, never half-written

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(download, todo))
        (dest / SYNC_MARKER).touch()
    return dest
