"""A trial's checkpoint by its MLflow run id: the run's `checkpoint_uri` tag (written by the sweep
driver when the trial ends, orchestrator/trials/mlflow_logger.py) names the folder of
trainers/loop.py's trainer_state.pt, on local disk or in S3. A checkpoint kept past pruning
(orchestrator/trials/checkpoint_pruner.py: milestones, the two either side of emergence) is
found by its step, from its `checkpoint_uri.step_NNNNNNN` tag."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.stores.mlflow_runs import CHECKPOINT_TAG
from orchestrator.stores.reachable import store_problem
from trainers.emergence.keys import kept_checkpoint_step, kept_checkpoint_tag
from trainers.loop import CHECKPOINT_FILE


class StoreError(RuntimeError):
    """The MLflow store or a trial's checkpoint cannot be read; one line says which and why."""


def check_store(uri: str) -> None:
    """Fail before MLflow creates an empty store or retries for minutes (reading a trial only)."""
    problem = store_problem(uri)
    if problem:
        raise StoreError(f"{problem} or --tracking-uri" if problem.endswith("MLFLOW_TRACKING_URI") else problem)


def trial_checkpoint(uri: str, run_id: str, cache: Path, step: int | None = None) -> tuple[Path, dict[str, str]]:
    """The local trainer_state.pt of a trial run (downloaded from S3 into `cache` if need be) and the
    run's tags: its final checkpoint, or with `step` the one it kept at that step."""
    check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException for an unknown id; store errors differ per backend
        raise StoreError(f"run {run_id}: not found at {uri} ({exc.__class__.__name__})") from None
    tags = dict(run.data.tags)
    if step is not None and kept_checkpoint_tag(step) in tags:
        return _local(tags[kept_checkpoint_tag(step)], run_id, cache / f"{run_id}@{step}", kept_checkpoint_tag(step)), tags
    location = tags.get(CHECKPOINT_TAG)
    if not location:
        if step is not None:
            raise StoreError(f"run {run_id} keeps no checkpoint at step {step}; {_kept_steps(tags, None)}")
        raise StoreError(f"run {run_id} has no {CHECKPOINT_TAG} tag: its trial saved no checkpoint (or is no trial)")
    path = _local(location, run_id, cache / run_id, CHECKPOINT_TAG)
    if step is not None:
        final = checkpoint_step(path)
        if final != step:
            raise StoreError(f"run {run_id} keeps no checkpoint at step {step}; {_kept_steps(tags, final)}")
    return path, tags


def checkpoint_step(path: Path) -> int:
    """The training step a trainer_state.pt holds, read without loading the tensors into memory."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state["step"])


def _kept_steps(tags: dict[str, str], final: int | None) -> str:
    steps = sorted(s for s in (kept_checkpoint_step(tag) for tag in tags) if s is not None)
    kept = f"it keeps steps {', '.join(map(str, steps))}" if steps else "it keeps no checkpoint by step"
    return kept + (f" and its final checkpoint (step {final})" if final is not None else "")


def _local(location: str, run_id: str, folder: Path, tag: str) -> Path:
    if location.startswith("s3://"):
        return _download_s3(location, folder)
    path = Path(location.removeprefix("file://")) / CHECKPOINT_FILE
    if not path.is_file():
        raise StoreError(f"run {run_id}: checkpoint {path} does not exist (tag {tag}={location})")
    return path


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
