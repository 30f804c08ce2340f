"""MLflow layout of a sweep (see DESIGN.md): experiment per sweep, parent run per launch,
exactly one nested child run per Tune trial.

The child run is found again by its tags (parent run id + trial id), not by a map that a
crash would lose, so a retried, restored or resumed trial reattaches to the run it already
has instead of opening a second one. The driver writes a trial's metrics in batches as
each checkpoint's report arrives (orchestrator/trials/mlflow_logger.py): after a crash, the steps
since the last checkpoint are re-run and logged once, so the history has no gaps and no
repeats.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient


ROLE_TAG = "sweep.role"
TRIAL_ROLE = "trial"
SWEEP_TAG = "sweep.name"
LAUNCH_TAG = "sweep.launch"
SPEC_FILE_TAG = "sweep.spec_file"
TRIAL_ID_TAG = "trial_id"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
FAILURE_TAG = "failure_reason"
CHECKPOINT_TAG = "checkpoint_uri"
RETRIES_TAG = "retries"  # how many times Tune restarted the trial from its last checkpoint
# A trial the sweep's scheduler (ASHA) stopped before its last step: the step it reached, and why.
# Its run is FINISHED, but its metrics are those of a shorter run than its axis.steps says.
STOPPED_AT_STEP_TAG = "stopped_early.step"
STOPPED_REASON_TAG = "stopped_early.reason"
DIVERGED_PREFIX = "non-finite loss"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id; a new one gets `artifact_location` (e.g. s3://bucket/mlflow), an existing one keeps its own."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=2,
    )
    return runs[0].info.run_id if runs else None


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every trial run of one launch (paged: a sweep may have thousands). Only the trials: an
    analysis of the launch is nested under its parent run too (orchestrator/analyze/publish.py)."""
    runs: list[Any] = []
    token = None
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'"
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class TrialRun:
    """The MLflow run of one Tune trial; implements trainers.tracking.Tracker."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        status: str = "RUNNING",
        tags: Mapping[str, str] | None = None,
        logged_through: Mapping[str, int] | None = None,
        reattached: bool = False,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.status = status  # as found when attaching: FINISHED means a past attempt completed the trial
        self.tags = dict(tags or {})
        self.reattached = reattached  # an earlier attempt (retry, resumed sweep) opened this run
        # Last step already in the store, per metric key. A driver killed between writing a
        # report's metrics and saving Tune's experiment state makes the resumed trial
        # measure those steps again; they are dropped here so each (key, step) is written once.
        self._logged_through = dict(logged_through or {})
        self._pending: list[Metric] = []

    @classmethod
    def attach(
        cls,
        client: MlflowClient,
        *,
        experiment_id: str,
        parent_run_id: str,
        trial_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> "TrialRun":
        """Reattach to this trial's run if it has one, else create it (exactly one per trial).

        A reattached run keeps its status until `resume()`: the caller first decides
        whether there is anything left to do (a trial that already finished).
        """
        run_id = find_trial_run(client, experiment_id, parent_run_id, trial_id)
        if run_id is not None:
            run = client.get_run(run_id)
            logged = {metric.key: int(metric.step) for metric in run.data._metric_objs}
            return cls(
                client, run_id, status=run.info.status, tags=run.data.tags, logged_through=logged, reattached=True
            )
        all_tags = {**tags, PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id, ROLE_TAG: TRIAL_ROLE}
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        client.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        return cls(client, run.info.run_id, tags=all_tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if step > self._logged_through.get(key, -1)
        )

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, tmp, artifact_dir)

    def log_measured(self, metrics: Iterable[tuple[str, float, int, int]]) -> None:
        """Metrics as (key, value, timestamp ms, step), measured elsewhere (a trial worker);
        steps already in the store are skipped, so a resumed trial writes no repeats."""
        self._pending.extend(
            Metric(key, value, timestamp, step)
            for key, value, timestamp, step in metrics
            if step > self._logged_through.get(key, -1)
        )
        self.flush()

    def flush(self) -> None:
        """Write buffered metrics in batches (one call per 1000 values, not one per value)."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[start : start + 1000])
        for metric in pending:
            self._logged_through[metric.key] = max(metric.step, self._logged_through.get(metric.key, -1))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags.update({k: str(v) for k, v in tags.items()})

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
        self.status = status

    def resume(self) -> None:
        """Mark a reattached run RUNNING again (a retry or a resumed sweep continues it)."""
        self.client.update_run(self.run_id, status="RUNNING")
        self.status = "RUNNING"

    def failure_reason(self) -> str | None:
        return self.tags.get(FAILURE_TAG)


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]  # MLflow's limit on a param value
