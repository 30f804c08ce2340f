"""AWS keys in the driver's environment reach no log, Tune result or MLflow record.

Ray Tune copies AWS_* keys from the driver into every trial actor's runtime_env, and Ray
logs runtime envs in plaintext (runtime_env_agent.log). The sweep moves the keys into a
private credentials file before Ray starts (orchestrator/launch/credentials.py). The unit
tests check that move; the sweep test runs a real sweep on S3 with fake keys and searches
every file the sweep, Ray and MLflow wrote, and shows that the trial workers still signed
their checkpoint uploads with the keys.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from s3_server import S3Endpoint
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec

from orchestrator.launch.credentials import credentials_in_file

FAKE = {
    "AWS_ACCESS_KEY_ID": f"AKIDFAKE{uuid.uuid4().hex[:12].upper()}",
    "AWS_SECRET_ACCESS_KEY": f"secret-{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"token-{uuid.uuid4().hex}",
}


def test_keys_move_into_a_private_file_for_the_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import botocore.session
    from ray.tune.execution.class_cache import _ActorClassCache

    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_PROFILE", "lab")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "users-own-file"))
    before = dict(os.environ)

    with credentials_in_file() as path:
        assert path is not None
        assert not any(name in os.environ for name in FAKE)
        assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.read_text().startswith("[lab]\n")
        # The standard chain finds the same credentials, now in the file.
        found = botocore.session.Session().get_credentials()
        assert (found.access_key, found.secret_key, found.token) == tuple(FAKE.values())
        assert found.method == "shared-credentials-file"
        # What Ray Tune puts in a trial actor's runtime_env holds none of them.
        class Trainable:
            pass

        runtime_env = _ActorClassCache().get(Trainable)._default_options["runtime_env"]
        assert not any(value in repr(runtime_env) for value in FAKE.values()), runtime_env

    assert dict(os.environ) == before
    assert not path.parent.exists()


def test_nothing_changes_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*FAKE, "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with credentials_in_file() as path:
        assert path is None and dict(os.environ) == before


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """TMPDIR for the sweep: Ray's session folder goes under it (kept short, as Ray's socket paths are limited)."""
    folder = Path(tempfile.mkdtemp(prefix="cred", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_a_sweep_writes_the_keys_nowhere(
    s3: S3Endpoint, s3_client: Any, tmp_path: Path, short_tmpdir: Path
) -> None:
    s3_client.create_bucket(Bucket="lab")
    spec = tiny_spec(tmp_path, storage="s3://lab/sweeps", mlflow={"artifact_location": "s3://lab/mlflow"})
    done = run_sweep_cli(
        tmp_path,
        str(write_spec(tmp_path, spec)),
        TMPDIR=str(short_tmpdir),
        AWS_EC2_METADATA_DISABLED="true",  # a worker without keys fails fast instead of asking for a role
        **FAKE,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    # The trial workers uploaded their checkpoints signed with the keys: they had them.
    uploads = [r for r in s3.requests if r.method in ("PUT", "POST") and "/checkpoint_" in r.path]
    assert uploads and {r.access_key_id for r in uploads} == {FAKE["AWS_ACCESS_KEY_ID"]}, uploads[:5]

    ray_logs = list(short_tmpdir.glob("ray/session_*/logs/runtime_env_agent.log"))
    assert ray_logs, sorted(str(p) for p in short_tmpdir.rglob("*"))[:50]
    written = files_under(tmp_path, short_tmpdir)  # the MLflow store, Ray's session folder, Tune's staging
    assert len(written) > 50, written
    objects = [item["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket="lab")
               for item in page.get("Contents", [])]  # Tune's state and results, checkpoints, MLflow artifacts
    assert any("/checkpoint_" in key for key in objects) and any(key.startswith("mlflow/") for key in objects)
    for name, value in FAKE.items():
        assert value not in output, name
        for path in written:
            assert value.encode() not in path.read_bytes(), (name, path)
        for key in objects:
            assert value.encode() not in s3_client.get_object(Bucket="lab", Key=key)["Body"].read(), (name, key)
