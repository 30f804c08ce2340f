"""Checks that run before Ray starts and before any GPU time is spent.

Each failure is one PreflightError whose message names the thing that is wrong (the
dataset path, the tracking URI, the bucket) and what to do about it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.stores.s3 import (
    StorageCheckError,
    check_s3_writable,
    has_credentials_in_url,
)
from trainers.config import TrainConfig
from trainers.data import DatasetNotFoundError, check_data


class PreflightError(RuntimeError):
    pass


def check_datasets(configs: list[TrainConfig]) -> None:
    seen: set[str] = set()
    for cfg in configs:
        key = cfg.data.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            check_data(cfg.data)
        except DatasetNotFoundError as error:
            raise PreflightError(f"dataset: {error}") from None


def check_tracking(uri: str) -> None:
    """The tracking store answers (server) or can be created (local SQLite / file store)."""
    if has_credentials_in_url(uri):
        # The URI travels in every trial's Tune config (params.json): keep secrets out of it.
        raise PreflightError(
            "MLFLOW_TRACKING_URI contains credentials; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD instead"
        )
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_tracking_server(uri)
    elif scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if not os.access(path.parent if not path.exists() else path, os.W_OK):
            raise PreflightError(f"MLflow store {uri}: {path.parent} is not writable")
    elif scheme in ("", "file"):
        path = Path(urlparse(uri).path or uri)
        parent = path if path.exists() else path.parent
        if not os.access(parent, os.W_OK):
            raise PreflightError(f"MLflow store {uri}: {parent} is not writable")


def _check_tracking_server(uri: str) -> None:
    import requests

    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search"
    try:
        # Bounded (connect, read) timeouts and no retries: an unreachable server fails in seconds.
        response = requests.post(url, json={"max_results": 1}, auth=auth, timeout=(5, 10))
    except requests.RequestException as error:
        raise PreflightError(f"MLflow server {uri} is unreachable ({type(error).__name__}); start it or fix MLFLOW_TRACKING_URI") from None
    if response.status_code in (401, 403):
        raise PreflightError(
            f"MLflow server {uri} refused the credentials (HTTP {response.status_code}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if response.status_code != 200:
        raise PreflightError(f"MLflow server {uri} answered HTTP {response.status_code}: {response.text[:200]}")


def check_storage(storage: str) -> None:
    """The storage location exists (or can be made) and takes a write."""
    if has_credentials_in_url(storage):
        raise PreflightError(
            "storage: the URL holds credentials; remove them and use the standard AWS chain "
            "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role)"
        )
    if storage.startswith("s3://"):
        _check_s3(storage, "storage")
        return
    if "://" in storage:
        return  # other URLs never get here: the spec refuses them (orchestrator/spec/schema.py)
    path = Path(storage).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PreflightError(f"storage {storage}: cannot write there ({error.strerror})") from None


def check_artifact_location(location: str | None) -> None:
    """An S3 artifact root for a new MLflow experiment takes a write (others: MLflow reports them)."""
    if location and location.startswith("s3://"):
        _check_s3(location, "MLflow artifact location")


def _check_s3(uri: str, what: str) -> None:
    try:
        check_s3_writable(uri, what)
    except StorageCheckError as error:
        raise PreflightError(str(error)) from None


def run_preflight(
    configs: list[TrainConfig], tracking_uri: str, storage: str, artifact_location: str | None = None
) -> None:
    check_datasets(configs)
    check_tracking(tracking_uri)
    check_storage(storage)
    check_artifact_location(artifact_location)
