"""Driver-side Tune callback: every trial's MLflow run, written from the driver.

Trial workers never import MLflow (orchestrator/trials/records.py says why). This callback opens
or reattaches the trial's one child run when Tune starts the trial, writes the metrics,
probe files and tags that each checkpoint's report carries, and closes the run.

In Ray 2.60 the controller calls `on_trial_recover` when it will retry a failed trial
(from its last checkpoint, in the same MLflow run) and `on_trial_error` only once it gives
up (`_process_trial_failure` in ray/tune/execution/tune_controller.py). So a retry only
counts up the run's `retries` tag, and only a final error marks the run FAILED with the
reason. When a trial completes, this records where its final checkpoint lives, and when the
sweep's scheduler stopped it before its last step, that step and why (the analysis leaves such
runs out of its final-length tables).

Tune retries every error alike and has no hook to skip a retry. A diverged trial would
train again from its last checkpoint and diverge again, up to `max_failures` times, so
`on_trial_recover` writes the divergence into the trial's config, which Tune hands to the
retry's worker: the retry fails at once (orchestrator/trials/trainable.py, DIVERGED_KEY).

The callback is pickled into the Tuner's state and comes back on `Tuner.restore`, so it
holds no client and no open runs across pickling: a restored callback finds each trial's
run again by its tags.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

from orchestrator.stores.mlflow_runs import (
    CHECKPOINT_TAG,
    DIVERGED_PREFIX,
    FAILURE_TAG,
    RETRIES_TAG,
    STOPPED_AT_STEP_TAG,
    STOPPED_REASON_TAG,
    TrialRun,
    flatten,
)
from orchestrator.trials.kept_checkpoints import storage_uri
from orchestrator.trials.records import RECORDS_KEY, TrialRecords
from orchestrator.trials.trainable import (
    DIVERGED_KEY,
    axis_tags,
    trial_config,
    trial_label,
)

# How trainers.loop.NonFiniteLossError reads in the error text Tune keeps for a trial.
NON_FINITE = re.compile(r"NonFiniteLossError: (.+)")
# Tune's error file holds every failure of a trial, each under a header like this one.
FAILURE_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^)\n]*\)$", re.MULTILINE)


@dataclass(frozen=True)
class SweepContext:
    """Where a launch's trial runs go, and the code they ran."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    # The scheduler that may stop trials early, as a stopped run's reason names it ('' = none).
    # A default, so that a context pickled in an older launch's Tune state still loads.
    scheduler: str = ""
    scheduler_metric: str = ""


# Where Ray's TuneReportCallback puts the path of a multi-worker trial's checkpoint (Ray Train
# keeps it; the Tune trial itself has none): ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY.
TRAIN_CHECKPOINT_PATH_KEY = "checkpoint_path"


def checkpoint_uri(trial: Trial, train_checkpoint: str | None = None) -> str | None:
    """The URI of the trial's latest checkpoint: Tune's, or for a multi-worker trial the path
    of Ray Train's latest (`train_checkpoint`, from its reports), on the trial's storage."""
    checkpoint = trial.checkpoint
    if checkpoint is not None:
        return storage_uri(checkpoint.path, checkpoint.filesystem.type_name if checkpoint.filesystem is not None else "local")
    if train_checkpoint is None:
        return None
    filesystem = getattr(getattr(trial, "storage", None), "storage_filesystem", None)
    return storage_uri(train_checkpoint, filesystem.type_name if filesystem is not None else "local")


def error_text(trial: Trial) -> str:
    """The trial's latest error, as Tune wrote it.

    Tune appends each failure to the error file in the driver's staging folder before it
    calls the callbacks, and copies that file to the trial's storage only later; so the
    staged file is read first, and `get_error()` (storage) is the fallback.
    """
    text = None
    staged = trial.error_file
    if staged and os.path.exists(staged):
        text = Path(staged).read_text(errors="replace")
    else:
        try:
            text = trial.get_error()
        except Exception:  # the error file may be gone with a lost node
            text = None
    if not text or not str(text).strip():
        return "trial failed (no error text was saved)"
    latest = FAILURE_HEADER.split(str(text))[-1].strip()
    return latest or str(text).strip()


def diverged_message(text: str) -> str | None:
    """The NonFiniteLossError's message in a trial's error text, or None for other errors."""
    found = NON_FINITE.findall(text)
    return found[-1].strip() if found else None


def failure_reason(trial: Trial) -> str:
    """The last line of the trial's error; a diverged trial's says so with DIVERGED_PREFIX."""
    text = error_text(trial)
    diverged = diverged_message(text)
    if diverged:
        return f"{DIVERGED_PREFIX}: {diverged}"[:500]
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:500]


class MlflowTrialLogger(Callback):
    def __init__(self, context: SweepContext) -> None:
        self.context = context
        self.failed: list[str] = []
        self._client: MlflowClient | None = None
        self._runs: dict[str, TrialRun] = {}
        self._train_checkpoints: dict[str, str] = {}  # trial id -> its Ray Train checkpoint's path (multi-worker)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.context.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_train_checkpoints": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_train_checkpoints": {}, **state})  # a launch's state from before the key existed

    def trial_run(self, trial: Trial) -> TrialRun:
        """The trial's run: opened on first sight, or found again (a retry, a resumed sweep)."""
        run = self._runs.get(trial.trial_id)
        if run is not None:
            return run
        index, axes = trial.config["trial"]["index"], trial.config["trial"]["axes"]
        cfg = trial_config(trial.config["train"], axes)
        run = TrialRun.attach(
            self.client,
            experiment_id=self.context.experiment_id,
            parent_run_id=self.context.parent_run_id,
            trial_id=trial.trial_id,
            run_name=trial_label(axes, index),
            tags={**axis_tags(cfg, axes), "git_commit": self.context.git_commit, "trial_name": str(trial)},
            params=flatten(cfg.model_dump()),
        )
        # A finished run stays as it is: its trial completed just before a driver crash
        # and only reports its result again. Any other reattached run continues.
        if run.reattached and run.status != "FINISHED":
            run.resume()
        self._runs[trial.trial_id] = run
        return run

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.trial_run(trial)

    def tag_trial(self, trial: Trial, tags: dict[str, str]) -> None:
        """Tags another driver callback learned (the checkpoint pruner: the checkpoints it keeps for good)."""
        self.trial_run(trial).set_tags(tags)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        # Tune lets callbacks change the result in place before it keeps it as the trial's
        # last result: the records must not reach Tune's state, result.json or progress.csv.
        records = TrialRecords.from_report(result.pop(RECORDS_KEY, None))
        if isinstance(result.get(TRAIN_CHECKPOINT_PATH_KEY), str):
            self._train_checkpoints[trial.trial_id] = result[TRAIN_CHECKPOINT_PATH_KEY]
        run = self.trial_run(trial)
        if records and run.status != "FINISHED":
            write_records(run, records)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run = self.trial_run(trial)
        if run.status != "FINISHED":
            run.finish("FINISHED")
        stopped = self.stopped_early(trial)
        if stopped and STOPPED_AT_STEP_TAG not in run.tags:
            run.set_tags(stopped)
        uri = checkpoint_uri(trial, self._train_checkpoints.get(trial.trial_id))
        # First completion wins: a trial that finished just before a driver crash is
        # reported again on resume, possibly with an older checkpoint from Tune's state.
        if uri and CHECKPOINT_TAG not in run.tags:
            run.set_tags({CHECKPOINT_TAG: uri})

    def stopped_early(self, trial: Trial) -> dict[str, str]:
        """The tags of a trial that completed before its last step: only the sweep's scheduler
        stops a trial early (the launch sets no other stopper), and it decides on a report."""
        last = trial.last_result or {}
        step = last.get("step")
        steps = trial_config(trial.config["train"], trial.config["trial"]["axes"]).steps
        if not isinstance(step, (int, float)) or step >= steps:
            return {}
        metric = self.context.scheduler_metric
        value = last.get(metric) if metric else None
        measured = f" with {metric} = {value:.4g}" if isinstance(value, (int, float)) else ""
        scheduler = self.context.scheduler or "the sweep's scheduler"
        return {
            STOPPED_AT_STEP_TAG: str(int(step)),
            STOPPED_REASON_TAG: f"stopped by {scheduler} at step {int(step)} of {steps}{measured}: "
            "below its rung's cutoff",
        }

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        diverged = diverged_message(error_text(trial))
        if diverged and DIVERGED_KEY not in trial.config["trial"]:
            # Tune builds the retry's config from trial.config. set_config also refreshes the
            # trial's saved state, so a resumed sweep does not train the trial again either.
            trial.set_config({**trial.config, "trial": {**trial.config["trial"], DIVERGED_KEY: diverged}})
        run = self.trial_run(trial)
        run.set_tags({RETRIES_TAG: str(int(run.tags.get(RETRIES_TAG, "0")) + 1)})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.failed.append(trial.trial_id)
        run = self.trial_run(trial)
        tags = {} if FAILURE_TAG in run.tags else {FAILURE_TAG: failure_reason(trial)}
        uri = checkpoint_uri(trial, self._train_checkpoints.get(trial.trial_id))
        if uri:
            tags[CHECKPOINT_TAG] = uri
        if tags:
            run.set_tags(tags)
        if run.status != "FAILED":
            run.finish("FAILED")


def write_records(run: TrialRun, records: TrialRecords) -> None:
    """Write what a worker reported with one checkpoint (orchestrator/trials/records.py)."""
    if records.tags:
        run.set_tags(records.tags)
    run.log_measured(records.metrics)
    folders: dict[str, dict[str, bytes]] = {}
    for folder, name, data in records.files:
        folders.setdefault(folder, {})[name] = data
    for folder, files in folders.items():
        run.log_files(files, folder)
