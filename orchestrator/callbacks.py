"""Driver-side Tune callback: the MLflow bookkeeping a trial cannot do for itself.

A worker killed with SIGKILL or a preempted node cannot close its run. In Ray 2.60 the
controller calls `on_trial_recover` when it will retry a failed trial (from its last
checkpoint, in the same MLflow run) and `on_trial_error` only once it gives up
(`_process_trial_failure` in ray/tune/execution/tune_controller.py). So a retry only
counts up the run's `retries` tag, and only a final error marks the run FAILED with the
reason. When a trial completes, this records where its final checkpoint lives.

The callback is pickled into the Tuner's state and comes back on `Tuner.restore`, so it
holds no client across pickling.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

from orchestrator.tracking import CHECKPOINT_TAG, FAILURE_TAG, RETRIES_TAG, find_trial_run


def checkpoint_uri(trial: Trial) -> str | None:
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return None
    scheme = checkpoint.filesystem.type_name if checkpoint.filesystem is not None else "local"
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def last_error_line(trial: Trial) -> str:
    try:
        error = trial.get_error()
    except Exception:  # the error file may be gone with a lost node
        error = None
    text = str(error).strip() if error else "trial failed (no error text was saved)"
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:500]


class MlflowTrialBookkeeping(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.failed: list[str] = []
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _run_id(self, trial: Trial) -> str | None:
        return find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_id(trial)
        uri = checkpoint_uri(trial)
        # First completion wins: a trial that finished just before a driver crash is
        # reported again on resume, possibly with an older checkpoint from Tune's state.
        if run_id and uri and CHECKPOINT_TAG not in self.client.get_run(run_id).data.tags:
            self.client.set_tag(run_id, CHECKPOINT_TAG, uri)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id is None:  # it failed before opening its run; the retry opens it
            return
        retries = int(self.client.get_run(run_id).data.tags.get(RETRIES_TAG, "0"))
        self.client.set_tag(run_id, RETRIES_TAG, str(retries + 1))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.failed.append(trial.trial_id)
        run_id = self._run_id(trial)
        if run_id is None:
            return
        run = self.client.get_run(run_id)
        if FAILURE_TAG not in run.data.tags:
            self.client.set_tag(run_id, FAILURE_TAG, last_error_line(trial))
        uri = checkpoint_uri(trial)
        if uri:
            self.client.set_tag(run_id, CHECKPOINT_TAG, uri)
        if run.info.status != "FAILED":
            self.client.set_terminated(run_id, status="FAILED")
