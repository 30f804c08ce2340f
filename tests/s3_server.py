"""A local S3 for tests: moto's server on loopback, reached through AWS_ENDPOINT_URL.

The code under test sees an ordinary S3 endpoint and the standard credential variables,
exactly as it would with MinIO or AWS, so nothing in orchestrator/ knows about moto.
"""

from __future__ import annotations

import logging
import re
import socket
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3Request:
    method: str
    path: str  # /bucket/key (path-style, as clients address a loopback endpoint)
    access_key_id: str | None  # from the SigV4 Authorization header; None for an unsigned request
    range: str | None = None  # the Range header (ranged GETs), if any


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    secret_key: str  # a unique string, so tests can prove it never leaks into logs or runs
    requests: list[S3Request] = field(default_factory=list)  # every request the server received

    def env(self) -> dict[str, str]:
        """The variables a sweep needs to reach this endpoint (set them in os.environ or a subprocess)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing-access-key",
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            # No profile or file from the machine running the tests may take part.
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }


@contextmanager
def moto_s3_server() -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer
    from moto.moto_server import threaded_moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    endpoint = S3Endpoint(url=f"http://127.0.0.1:{port}", secret_key=f"secret-{uuid.uuid4().hex}")
    dispatcher = threaded_moto_server.DomainDispatcherApplication

    def recording_app(*args: Any) -> Callable[..., Any]:
        app = dispatcher(*args)

        def record(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            signed = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
            endpoint.requests.append(
                S3Request(
                    environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), signed.group(1) if signed else None,
                    environ.get("HTTP_RANGE"),
                )
            )
            return app(environ, start_response)

        return record

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    threaded_moto_server.DomainDispatcherApplication = recording_app  # read once, as the server thread starts
    try:
        server.start()
    finally:
        threaded_moto_server.DomainDispatcherApplication = dispatcher
    # moto keeps its buckets per process, not per server: start each test from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10)
    try:
        yield endpoint
    finally:
        server.stop()
