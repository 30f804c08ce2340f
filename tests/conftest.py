"""Fixtures shared by several test modules (keep this small; helpers live in their own modules)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from s3_server import S3Endpoint, moto_s3_server


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """A moto S3 server on loopback with AWS_* set in this process (and so in subprocesses it starts)."""
    with moto_s3_server() as endpoint:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in endpoint.env().items():
            monkeypatch.setenv(name, value)
        yield endpoint


@pytest.fixture
def s3_client(s3: S3Endpoint) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3.url)
