"""A trial's final checkpoint by its MLflow run id: the run's `checkpoint_uri` tag (written by
the sweep driver when the trial ends, orchestrator/trials/mlflow_logger.py) names the folder of
trainers/loop.py's trainer_state.pt, on local disk or in S3."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.stores.mlflow_runs import CHECKPOINT_TAG
from orchestrator.stores.reachable import store_problem
from trainers.loop import CHECKPOINT_FILE


class StoreError(RuntimeError):
    """The MLflow store or a trial's checkpoint cannot be read; one line says which and why."""


def check_store(uri: str) -> None:
    """Fail before MLflow creates an empty store or retries for minutes (reading a trial only)."""
    problem = store_problem(uri)
    if problem:
        raise StoreError(f"{problem} or --tracking-uri" if problem.endswith("MLFLOW_TRACKING_URI") else problem)


def trial_checkpoint(uri: str, run_id: str, cache: Path) -> tuple[Path, dict[str, str]]:
    """The local trainer_state.pt of a trial run (downloaded from S3 into `cache` if need be) and the run's tags."""
    check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException for an unknown id; store errors differ per backend
        raise StoreError(f"run {run_id}: not found at {uri} ({exc.__class__.__name__})") from None
    tags = dict(run.data.tags)
    location = tags.get(CHECKPOINT_TAG)
    if not location:
        raise StoreError(f"run {run_id} has no {CHECKPOINT_TAG} tag: its trial saved no checkpoint (or is no trial)")
    if location.startswith("s3://"):
        return _download_s3(location, cache / run_id), tags
    path = Path(location.removeprefix("file://")) / CHECKPOINT_FILE
    if not path.is_file():
        raise StoreError(f"run {run_id}: checkpoint {path} does not exist (tag {CHECKPOINT_TAG}={location})")
    return path, tags


def _download_s3(location: str, folder: Path) -> Path:
    from orchestrator.stores.s3 import S3Location, bounded_s3_client

    where = S3Location.parse(location)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    try:
        bounded_s3_client().download_file(where.bucket, where.key(CHECKPOINT_FILE), str(target))
    except Exception as exc:  # botocore's errors: missing key, credentials, endpoint
        raise StoreError(f"cannot download {location}/{CHECKPOINT_FILE}: {exc}") from None
    return target
