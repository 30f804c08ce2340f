"""The MLflow side of a launch: its parent run, and the trial runs a crash or Ctrl-C leaves open.

orchestrator/launch/run.py imports this module and opens the store in a thread that runs
beside Ray's start: importing MLflow (1-2 s of CPU) and creating a new store's schema (about
1 s) then overlap with it. The runs themselves are written once Ray is up (`open_launch`).
"""

from __future__ import annotations

import sys
import time

import yaml
from mlflow.tracking import MlflowClient

from orchestrator.launch.record import Launch, LaunchRecord, write_record
from orchestrator.stores.mlflow_store import open_client
from orchestrator.stores.mlflow_runs import (
    FAILURE_TAG,
    LAUNCH_TAG,
    ROLE_TAG,
    SPEC_FILE_TAG,
    SWEEP_TAG,
    child_runs,
    get_or_create_experiment,
)


def open_store(launch: Launch) -> MlflowClient:
    """The launch's MLflow store; a new SQLite store gets its schema here, safely."""
    return open_client(launch.tracking_uri)


def open_launch(launch: Launch, client: MlflowClient) -> LaunchRecord:
    """A fresh launch gets a parent run and a record; a resumed one gets its parent run back."""
    found = launch.found
    if launch.resumed:
        assert found is not None
        client.update_run(found.parent_run_id, status="RUNNING")
        closed = close_orphans(client, found.experiment_id, found.parent_run_id)
        print(
            f"Resuming launch {launch.name!r} from {launch.path} "
            f"(parent run {found.parent_run_id}; {closed} interrupted trial runs)"
        )
        return found
    if found is not None:
        # Killed before Tune saved anything to restore from: close the old runs, start over.
        abandon_launch(client, found)
        print(f"Launch {launch.name!r} in {launch.path} had no Tune state to restore; starting it again")
    spec = launch.spec
    experiment_id = get_or_create_experiment(client, spec.experiment_name, spec.mlflow.artifact_location)
    parent_run_id = open_parent_run(client, experiment_id, launch)
    record = LaunchRecord(parent_run_id, experiment_id, launch.spec_digest, "running")
    write_record(launch.path, record)
    return record


def open_parent_run(client: MlflowClient, experiment_id: str, launch: Launch) -> str:
    spec = launch.spec
    run = client.create_run(
        experiment_id,
        run_name=f"{launch.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            ROLE_TAG: "parent",
            SWEEP_TAG: spec.name,
            LAUNCH_TAG: launch.name,
            SPEC_FILE_TAG: launch.spec_file,
            "git_commit": launch.commit,
        },
    )
    run_id = run.info.run_id
    client.log_param(run_id, "overrides", " ".join(launch.overrides) if launch.overrides else "(none)")
    client.log_text(run_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec/resolved.yaml")
    client.log_text(run_id, launch.plan_text, "spec/plan.txt")
    return run_id


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str) -> int:
    """Runs left RUNNING by a killed driver become KILLED; a restored trial sets its own back to RUNNING."""
    orphans = [r for r in child_runs(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(orphans)


def abandon_launch(client: MlflowClient, record: LaunchRecord) -> None:
    """An interrupted launch: its parent and unfinished trial runs become KILLED (the record stays
    'running', so the same command resumes it and sets them RUNNING again)."""
    close_orphans(client, record.experiment_id, record.parent_run_id)
    client.set_terminated(record.parent_run_id, status="KILLED")


def fail_launch(client: MlflowClient, record: LaunchRecord, error: BaseException) -> None:
    """Tune itself stopped with an error (not a trial's: those Tune retries and records): the
    trial runs it left open and the parent run become FAILED, with the reason, never RUNNING.
    The record stays 'running', so the same command can try to resume the launch."""
    # Tune wraps the cause in a TuneError whose text is the whole traceback: its last line names the cause.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = (lines[-1] if len(lines) > 1 else f"{type(error).__name__}: {lines[0] if lines else ''}")[:500]
    for run in child_runs(client, record.experiment_id, record.parent_run_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, FAILURE_TAG, f"the sweep stopped: {reason}")
            client.set_terminated(run.info.run_id, status="FAILED")
    client.set_tag(record.parent_run_id, FAILURE_TAG, reason)
    client.set_terminated(record.parent_run_id, status="FAILED")


def finish_launch(client: MlflowClient, record: LaunchRecord, path: str, trials: int, errored: int) -> None:
    """Tune is done with every trial: close what is left open, say which trials failed, mark it finished."""
    close_orphans(client, record.experiment_id, record.parent_run_id)
    report_failures(client, record.experiment_id, record.parent_run_id)
    client.set_tag(record.parent_run_id, "trials.errored", str(errored))
    client.set_tag(record.parent_run_id, "trials.total", str(trials))
    client.set_terminated(record.parent_run_id, status="FINISHED")
    record.state = "finished"
    write_record(path, record)


def report_failures(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    failed = [r for r in child_runs(client, experiment_id, parent_run_id) if r.info.status == "FAILED"]
    for run in sorted(failed, key=lambda r: r.info.run_name or ""):
        reason = run.data.tags.get(FAILURE_TAG, "no reason recorded")
        print(f"Trial {run.info.run_name} failed (MLflow run {run.info.run_id}): {reason}", file=sys.stderr)
