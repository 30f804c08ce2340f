"""S3 storage and artifacts against moto's server on loopback (through AWS_ENDPOINT_URL).

Preflight: a writable bucket passes and is left as it was; a missing bucket, an endpoint
that does not answer and an MLflow server that does not answer each give one error that
names the bucket or URL, exit 2, and nothing is started. The sweep: Tune's state and
checkpoints, the launch record and the MLflow artifacts land in the bucket, and the
secret key appears nowhere (params, tags, artifacts, bucket objects, CLI output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Endpoint, free_port
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec

from orchestrator.launch.preflight import (
    PreflightError,
    check_artifact_location,
    check_storage,
    check_tracking,
)
from orchestrator.spec.errors import SpecError
from orchestrator.spec.schema import parse_spec


def object_keys(s3_client: Any, bucket: str) -> list[str]:
    keys: list[str] = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


# ----------------------------------------------------------------------------- preflight, in process


def test_writable_bucket_passes_and_keeps_no_probe(s3: S3Endpoint, s3_client: Any) -> None:
    s3_client.create_bucket(Bucket="runs")
    check_storage("s3://runs/sweeps")
    check_artifact_location("s3://runs/mlflow")
    assert object_keys(s3_client, "runs") == []


def test_missing_bucket_is_named(s3: S3Endpoint) -> None:
    with pytest.raises(PreflightError, match=r"storage s3://no-such-bucket/sweeps: bucket 'no-such-bucket' does not exist"):
        check_storage("s3://no-such-bucket/sweeps")
    with pytest.raises(PreflightError, match=r"MLflow artifact location s3://absent/mlflow: bucket 'absent'"):
        check_artifact_location("s3://absent/mlflow")


def test_unreachable_endpoint_is_named(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(PreflightError, match=rf"cannot reach S3 at {dead} for bucket 'runs'"):
        check_storage("s3://runs/sweeps")


def test_missing_credentials_are_explained(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off EC2
    with pytest.raises(PreflightError, match=r"storage s3://runs/sweeps: no AWS credentials found"):
        check_storage("s3://runs/sweeps")


def test_unreachable_mlflow_server_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PreflightError, match=rf"MLflow server {url} is unreachable"):
        check_tracking(url)


def test_tracking_uri_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(PreflightError, match="MLFLOW_TRACKING_USERNAME") as caught:
        check_tracking("https://admin:very-secret@mlflow.example.org")
    assert "very-secret" not in str(caught.value)


@pytest.mark.parametrize("key", ["storage", "mlflow.artifact_location"])
def test_credentials_in_a_url_are_refused_without_echoing_them(key: str) -> None:
    raw: dict[str, Any] = {"name": "x"}
    url = "s3://AKIAEXAMPLE:very-secret@bucket/prefix"
    if key == "storage":
        raw["storage"] = url
    else:
        raw["mlflow"] = {"artifact_location": url}
    with pytest.raises(SpecError, match=f"{key}: the URL holds credentials") as caught:
        parse_spec(raw)
    assert "very-secret" not in str(caught.value)


# ----------------------------------------------------------------------------- preflight through the CLI


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["bucket", "mlflow"])  # endpoint: same path, tested in process
def test_cli_fails_before_starting_anything(
    broken: str, s3: S3Endpoint, s3_client: Any, tmp_path: Path
) -> None:
    s3_client.create_bucket(Bucket="runs")
    spec = tiny_spec(tmp_path, storage="s3://runs/sweeps", mlflow={"artifact_location": "s3://runs/mlflow"})
    env: dict[str, str] = {}
    if broken == "bucket":
        spec["storage"] = "s3://missing-bucket/sweeps"
        expected = "bucket 'missing-bucket' does not exist"
    else:
        env["MLFLOW_TRACKING_URI"] = dead = f"http://127.0.0.1:{free_port()}"
        expected = f"MLflow server {dead} is unreachable"
    done = run_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)), timeout=300, **env)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], done.stderr
    # Nothing started: no MLflow store, no Ray session output, nothing in the bucket.
    assert not (tmp_path / "mlflow.db").exists()
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert object_keys(s3_client, "runs") == []


# ----------------------------------------------------------------------------- a sweep on S3


def all_artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    files: list[str] = []
    for info in client.list_artifacts(run_id, path):
        files.extend(all_artifact_files(client, run_id, info.path) if info.is_dir else [info.path])
    return files


@pytest.mark.slow
def test_sweep_keeps_state_checkpoints_and_artifacts_in_s3(s3: S3Endpoint, s3_client: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    s3_client.create_bucket(Bucket="lab")
    spec = tiny_spec(tmp_path, storage="s3://lab/sweeps", mlflow={"artifact_location": "s3://lab/mlflow"})
    spec["train"]["steps"] = 8  # 4 checkpoints a trial (eval_every 2), of which the newest 2 are kept
    done = run_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    keys = object_keys(s3_client, "lab")
    assert "sweeps/e2e/sweep_launch.json" in keys
    assert any(k.startswith("sweeps/e2e/experiment_state") and k.endswith(".json") for k in keys), keys
    trial_dirs = {k.split("/")[2] for k in keys if k.startswith("sweeps/e2e/trial_")}
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:  # every trial's checkpoints went to the bucket; the superseded ones are gone
        checkpoints = {k.split("/")[3] for k in keys if k.startswith(f"sweeps/e2e/{trial_dir}/checkpoint_")}
        assert checkpoints == {"checkpoint_000002", "checkpoint_000003"}, (trial_dir, checkpoints)
    assert not (tmp_path / "ray_results").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.artifact_location == "s3://lab/mlflow"
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(runs) == 3 and len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("s3://lab/mlflow/")
        prefix = run.info.artifact_uri.removeprefix("s3://lab/") + "/probes/"
        assert any(k.startswith(prefix) for k in keys), f"no probe files under {prefix}"

    # The secret key reached every process through the environment, and nothing wrote it down.
    secret = s3.secret_key
    assert secret not in output
    for run in runs:
        assert all(secret not in f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
        for path in all_artifact_files(client, run.info.run_id):
            local = Path(client.download_artifacts(run.info.run_id, path, str(tmp_path / "downloads")))
            assert secret.encode() not in local.read_bytes(), path
    for key in keys:  # Tune's state, params.json, results, checkpoints, the launch record
        body = s3_client.get_object(Bucket="lab", Key=key)["Body"].read()
        assert secret.encode() not in body, key
