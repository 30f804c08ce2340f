"""S3 access for the checks that run before a sweep: one bounded client, one write probe.

Credentials always come from the standard AWS chain (environment, ~/.aws, instance or
pod role), never from the spec; AWS_ENDPOINT_URL points everything (boto3, pyarrow's
S3FileSystem that Tune uses, MLflow's artifact store) at an S3-compatible store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

# A preflight must fail in seconds, not after botocore's default backoff (up to 5 attempts
# with 60 s socket timeouts): one retry, short connect and read timeouts.
PREFLIGHT_CONNECT_TIMEOUT_S = 5
PREFLIGHT_READ_TIMEOUT_S = 15
PREFLIGHT_MAX_ATTEMPTS = 2


class StorageCheckError(RuntimeError):
    """A location cannot be written; the message names it and says what to do."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing '/'; may be empty

    @classmethod
    def parse(cls, uri: str) -> "S3Location":
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {uri}")
        return cls(parsed.netloc, parsed.path.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def has_credentials_in_url(uri: str) -> bool:
    """s3://KEY:SECRET@bucket/... works in pyarrow, and would copy the secret into every log."""
    return "://" in uri and "@" in urlparse(uri).netloc


def bounded_s3_client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=PREFLIGHT_CONNECT_TIMEOUT_S,
        read_timeout=PREFLIGHT_READ_TIMEOUT_S,
        retries={"max_attempts": PREFLIGHT_MAX_ATTEMPTS, "mode": "standard"},
    )
    # A fresh session reads the credential chain and AWS_ENDPOINT_URL now, not when boto3's
    # module-level default session was first used.
    return boto3.session.Session().client("s3", config=config)


def check_s3_writable(uri: str, what: str) -> None:
    """Put and delete one small object under the URL's prefix; StorageCheckError if that fails.

    `what` says which setting the URL came from ("storage", "MLflow artifact location").
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    location = S3Location.parse(uri)
    client = bounded_s3_client()
    endpoint = client.meta.endpoint_url
    probe = location.key(f".write-check-{uuid.uuid4().hex}")
    try:
        client.head_bucket(Bucket=location.bucket)
        client.put_object(Bucket=location.bucket, Key=probe, Body=b"ok")
        client.delete_object(Bucket=location.bucket, Key=probe)
    except NoCredentialsError:
        raise StorageCheckError(
            f"{what} {uri}: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or run where an instance or pod role applies"
        ) from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "error"))
        raise StorageCheckError(f"{what} {uri}: {_explain(code, location.bucket, endpoint)}") from None
    except BotoCoreError as error:
        raise StorageCheckError(
            f"{what} {uri}: cannot reach S3 at {endpoint} for bucket {location.bucket!r} ({type(error).__name__}); "
            "check the network and AWS_ENDPOINT_URL"
        ) from None


def _explain(code: str, bucket: str, endpoint: str) -> str:
    if code in ("404", "NoSuchBucket"):
        return f"bucket {bucket!r} does not exist at {endpoint}; create it or fix the URL"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return (
            f"access to bucket {bucket!r} at {endpoint} was denied ({code}); check the AWS credentials "
            "and that they may put and delete objects there"
        )
    return f"bucket {bucket!r} at {endpoint} is not writable ({code})"
