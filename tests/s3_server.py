"""A local S3 for tests: moto's server on loopback, reached through AWS_ENDPOINT_URL.

The code under test sees an ordinary S3 endpoint and the standard credential variables,
exactly as it would with MinIO or AWS, so nothing in orchestrator/ knows about moto.
"""

from __future__ import annotations

import logging
import socket
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    secret_key: str  # a unique string, so tests can prove it never leaks into logs or runs

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

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets per process, not per server: start each test from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10)
    try:
        yield S3Endpoint(url=f"http://127.0.0.1:{port}", secret_key=f"secret-{uuid.uuid4().hex}")
    finally:
        server.stop()
