"""MLflow for the inspection: reading a trial's checkpoint location, writing one run per model.

The inspection experiment holds one run per inspected model (and one per test-time-register
variant), tagged `sweep.role=inspection`, so a sweep analysis never counts them as trials,
plus one `inspection-report` run with the side-by-side report.
"""

from __future__ import annotations

import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.mlflow_uri import default_tracking_uri
from orchestrator.tracking import CHECKPOINT_TAG, ROLE_TAG, get_or_create_experiment
from trainers.loop import CHECKPOINT_FILE
from trainers.probes import names

INSPECTION_ROLE = "inspection"
REPORT_ROLE = "inspection-report"
PROBE_STEP = 0  # a pretrained model is probed once; its files sit under probes/step_0000000/


class StoreError(RuntimeError):
    """The MLflow store or a trial's checkpoint cannot be read; one line says which and why."""


def tracking_uri(explicit: str | None) -> str:
    return explicit or default_tracking_uri()


def check_store(uri: str) -> None:
    """Fail before MLflow creates an empty store or retries for minutes (reading a trial only)."""
    scheme = uri.split(":", 1)[0]
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        if path and not Path(path).exists():
            raise StoreError(f"no MLflow store at {path} (tracking URI {uri}); set MLFLOW_TRACKING_URI or --tracking-uri")
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(f"cannot reach the MLflow tracking server at {uri}: {exc}") from None


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
    from orchestrator.storage import S3Location, bounded_s3_client

    where = S3Location.parse(location)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    try:
        bounded_s3_client().download_file(where.bucket, where.key(CHECKPOINT_FILE), str(target))
    except Exception as exc:  # botocore's errors: missing key, credentials, endpoint
        raise StoreError(f"cannot download {location}/{CHECKPOINT_FILE}: {exc}") from None
    return target


class InspectionStore:
    """Writes the inspection experiment. Created only after every model and the data resolved."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.experiment = experiment
        self.experiment_id = get_or_create_experiment(self.client, experiment)

    def log_model_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, object],
        scalars: Mapping[str, float],
        files: Mapping[str, bytes],
        extra_files: Mapping[str, bytes] | None = None,
    ) -> str:
        """One finished run holding a probe's metrics (step 0) and files (probes/step_0000000/)."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={ROLE_TAG: INSPECTION_ROLE, **tags})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, PROBE_STEP) for k, v in scalars.items()]
        param_list = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, max(len(metrics), 1), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000], params=param_list if start == 0 else [])
        self._log_files(run_id, files, names.artifact_dir(PROBE_STEP))
        if extra_files:
            self._log_files(run_id, extra_files, "")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_report(self, folder: Path, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name="inspection-report", tags={ROLE_TAG: REPORT_ROLE, **tags})
        self.client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", "Side-by-side inspection: see report.md")])
        self.client.log_artifacts(run.info.run_id, str(folder))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def _log_files(self, run_id: str, files: Mapping[str, bytes], artifact_dir: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(run_id, tmp, artifact_dir or None)
