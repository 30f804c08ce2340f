"""AWS keys out of Ray's runtime envs: the driver hands them on in a file only the user can read.

Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SECURITY_TOKEN and
AWS_SESSION_TOKEN from the driver's environment into the runtime_env of every trial actor
(ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE, Ray 2.60), and Ray's
runtime_env_agent.log records runtime envs in plaintext, readable from the dashboard.

So before Ray starts, keys found in the environment move into an AWS shared-credentials
file (mode 0600 in a folder of mode 0700, under the profile AWS_PROFILE names, else
`default`), AWS_SHARED_CREDENTIALS_FILE points at it and the variables leave os.environ.
Every AWS client reads that file through the standard chain: boto3 (the preflight, MLflow's
S3 artifacts), pyarrow's S3FileSystem (Tune's storage in the driver and the workers). A
local Ray's workers inherit the path, never the keys. Workers of a cluster use their
node's own credentials (instance role, pod identity, ~/.aws on the node): see the README.
The file is deleted and the environment put back when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# What Ray Tune propagates; each key of the credentials file, in botocore's and the AWS SDKs' names.
KEY_VARIABLES = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key"}
TOKEN_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")  # the second is the legacy name of the first
CREDENTIALS_FILE_VARIABLE = "AWS_SHARED_CREDENTIALS_FILE"


@contextlib.contextmanager
def credentials_in_file() -> Iterator[Path | None]:
    """Within the block, AWS keys from the environment live in a private credentials file
    (its path is yielded; None when the environment held no keys and nothing changed)."""
    names = [name for name in (*KEY_VARIABLES, *TOKEN_VARIABLES) if name in os.environ]
    if not names:
        yield None
        return
    saved = {name: os.environ.get(name) for name in (*names, CREDENTIALS_FILE_VARIABLE)}
    entries = {key: os.environ[name] for name, key in KEY_VARIABLES.items() if os.environ.get(name)}
    token = next((os.environ[name] for name in TOKEN_VARIABLES if os.environ.get(name)), None)
    if token:
        entries["aws_session_token"] = token
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    folder = Path(tempfile.mkdtemp(prefix="sweep-aws-"))  # mode 0700
    try:
        path = folder / "credentials"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f"[{profile}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items()))
        for name in names:
            del os.environ[name]
        os.environ[CREDENTIALS_FILE_VARIABLE] = str(path)
        yield path
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
