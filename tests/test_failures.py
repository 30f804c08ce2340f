"""Trial failures: a killed worker is retried in the same MLflow run from its last
checkpoint; a diverging trial ends FAILED with the reason and the sweep goes on."""

from __future__ import annotations

import copy
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crash_helpers import (
    expected_steps,
    output,
    parent_runs,
    process_table,
    start_sweep_cli,
    store_client,
    train_loss_steps,
    trial_runs,
    wait_for_store,
)
from orchestrator.trials.mlflow_logger import MlflowTrialLogger, SweepContext, diverged_message, error_text, failure_reason
from orchestrator.trials.records import RECORDS_KEY, RecordBuffer
from orchestrator.trials.trainable import DIVERGED_KEY, run_trial
from orchestrator.stores.mlflow_runs import TrialRun, get_or_create_experiment
from sweep_helpers import tiny_spec, write_spec
from trainers.loop import NonFiniteLossError
from trainers.probes import names

STEPS, LOG_EVERY, EVAL_EVERY, PROBE_EVERY = 60, 5, 10, 20
GOOD_LR, DIVERGING_LR = 1.0e-3, 1.0e4  # 1e4 really makes the loss non-finite within a few steps


# ------------------------------------------------------------------ units, fast


def open_trial_run(client: Any, experiment_id: str, trial_id: str = "t1") -> TrialRun:
    return TrialRun.attach(
        client, experiment_id=experiment_id, parent_run_id="parent", trial_id=trial_id,
        run_name=trial_id, tags={}, params={"optim.lr": 1e-3},
    )


def test_reattached_run_writes_each_step_once(tmp_path: Path) -> None:
    client = store_client(tmp_path)
    experiment_id = get_or_create_experiment(client, "units")
    first = open_trial_run(client, experiment_id)
    for step in (5, 10):
        first.log_metrics({names.TRAIN_LOSS: 1.0 / step}, step)
    first.flush()  # ... and the worker dies before its checkpoint at step 10 is persisted

    retry = open_trial_run(client, experiment_id)  # resumes from the checkpoint at step 5
    assert retry.run_id == first.run_id and retry.reattached and retry.status == "RUNNING"
    for step in (10, 15):
        retry.log_metrics({names.TRAIN_LOSS: 1.0 / step}, step)
    retry.finish()
    assert train_loss_steps(client, first.run_id) == [5, 10, 15]
    assert open_trial_run(client, experiment_id).status == "FINISHED"
    assert open_trial_run(client, experiment_id, "t2").run_id != first.run_id


class UnitTrial(SimpleNamespace):
    """What the callback reads and sets of a Tune Trial."""

    def __init__(self, trial_id: str, error: str) -> None:
        config = {"train": tiny_spec(Path("."))["train"], "trial": {"index": 0, "axes": {"optim.lr": GOOD_LR}}}
        super().__init__(
            trial_id=trial_id, config=config, checkpoint=None, error=error, error_file=None, last_result={}
        )

    def get_error(self) -> str:
        return self.error

    def set_config(self, config: dict[str, Any]) -> None:
        self.config = config


def unit_logger(tmp_path: Path) -> tuple[Any, str, MlflowTrialLogger]:
    """A store, its experiment and the driver's callback writing to it, as a launch sets them up."""
    client = store_client(tmp_path)
    experiment_id = get_or_create_experiment(client, "units")
    context = SweepContext(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_id, "parent", "abc")
    return client, experiment_id, MlflowTrialLogger(context)


def ray_error(exception: str) -> str:
    """A trial's error text as Tune keeps it: the worker's traceback, the exception last."""
    return f"ray.exceptions.RayTaskError: ray::ImplicitFunc.train()\n  File x\ntrainers.loop.{exception}"


def test_callback_marks_failed_only_when_tune_gives_up(tmp_path: Path) -> None:
    client, experiment_id, callback = unit_logger(tmp_path)
    run = open_trial_run(client, experiment_id)
    trial = UnitTrial("t1", "Traceback\nRayActorError: worker died")

    callback.on_trial_recover(0, [], trial)
    callback.on_trial_recover(0, [], trial)
    state = client.get_run(run.run_id)
    assert state.info.status == "RUNNING" and state.data.tags["retries"] == "2"
    assert "failure_reason" not in state.data.tags
    assert DIVERGED_KEY not in trial.config["trial"]  # a lost worker is retried in full

    callback = pickle.loads(pickle.dumps(callback))  # as Tuner.restore brings it back
    callback.on_trial_error(0, [], trial)
    state = client.get_run(run.run_id)
    assert state.info.status == "FAILED"
    assert state.data.tags["failure_reason"] == "RayActorError: worker died"
    assert state.data.tags["retries"] == "2"


def test_callback_writes_reported_records_once_and_keeps_them_out_of_the_result(tmp_path: Path) -> None:
    client, experiment_id, callback = unit_logger(tmp_path)
    trial = UnitTrial("t7", "")
    callback.on_trial_start(0, [], trial)
    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "RUNNING" and run.data.tags["git_commit"] == "abc"
    assert run.data.tags["trial_id"] == "t7" and run.data.params["optim.lr"] == str(GOOD_LR)

    def report(steps: list[int]) -> dict[str, Any]:
        buffer = RecordBuffer()
        buffer.set_tags({"worker.pid": "42"})
        for step in steps:
            buffer.log_metrics({names.TRAIN_LOSS: 1.0 / step}, step)
        buffer.log_files({"table.json": b"{}"}, names.artifact_dir(steps[-1]))
        return {"step": steps[-1], RECORDS_KEY: buffer.take()}

    first = report([5, 10])
    callback.on_trial_result(0, [], trial, first)
    assert RECORDS_KEY not in first
    # A resumed trial restored from an older checkpoint measures step 10 again.
    callback = pickle.loads(pickle.dumps(callback))
    callback.on_trial_result(0, [], trial, report([10, 15]))
    callback.on_trial_complete(0, [], trial)

    state = client.get_run(run.info.run_id)
    assert state.info.status == "FINISHED" and state.data.tags["worker.pid"] == "42"
    assert train_loss_steps(client, run.info.run_id) == [5, 10, 15]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, names.artifact_dir(15))}
    assert artifacts == {f"{names.artifact_dir(15)}/table.json"}


def test_diverged_trial_gets_the_reason_from_its_error(tmp_path: Path) -> None:
    client, experiment_id, callback = unit_logger(tmp_path)
    callback.on_trial_error(0, [], UnitTrial("t9", ray_error("NonFiniteLossError: loss became non-finite at step 3")))
    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "non-finite loss: loss became non-finite at step 3"


def test_reason_comes_from_the_latest_failure_in_the_staged_error_file(tmp_path: Path) -> None:
    trial = UnitTrial("t3", "stale copy in storage")
    trial.error_file = str(tmp_path / "error.txt")
    Path(trial.error_file).write_text(
        "Failure # 1 (occurred at 2026-11-24_14-59-48)\n" + ray_error("NonFiniteLossError: at step 3") + "\n"
        "Failure # 2 (occurred at 2026-11-24_14-59-54)\nThe actor died unexpectedly before finishing this task.\n"
    )
    assert failure_reason(trial) == "The actor died unexpectedly before finishing this task."
    assert diverged_message(error_text(trial)) is None  # the latest failure was not a divergence
    Path(trial.error_file).unlink()
    assert failure_reason(trial) == "stale copy in storage"


def test_diverged_trial_is_retried_without_training_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, experiment_id, callback = unit_logger(tmp_path)
    trial = UnitTrial("t9", ray_error("NonFiniteLossError: loss became non-finite at step 3"))
    callback.on_trial_recover(0, [], trial)  # Tune will retry: the retry's config says why not to train
    assert trial.config["trial"][DIVERGED_KEY] == "loss became non-finite at step 3"

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a diverged trial's retry built a Trainer")

    monkeypatch.setattr("trainers.loop.Trainer", no_training)
    with pytest.raises(NonFiniteLossError) as retry:
        run_trial(copy.deepcopy(trial.config))
    assert str(retry.value) == "loss became non-finite at step 3 (in an earlier attempt; not trained again)"

    trial.error = ray_error(f"NonFiniteLossError: {retry.value}")
    callback.on_trial_recover(0, [], trial)  # a second retry keeps the first message
    assert trial.config["trial"][DIVERGED_KEY] == "loss became non-finite at step 3"
    callback.on_trial_error(0, [], trial)
    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["retries"] == "2"
    assert run.data.tags["failure_reason"] == f"non-finite loss: {retry.value}"


# ------------------------------------------------------- a real sweep, slow


def failing_spec(tmp_path: Path) -> dict[str, Any]:
    spec = tiny_spec(tmp_path, name="failures", max_concurrent=2, max_failures=1)
    spec["train"].update(steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY)
    spec["train"]["probe"] = {"every": PROBE_EVERY, "batch_size": 8}  # on, as the shipped specs run them
    spec["grid"] = {"optim.lr": [GOOD_LR, DIVERGING_LR]}
    return spec


def is_lr(run: Any, lr: float) -> bool:
    return float(run.data.params["optim.lr"]) == lr


def healthy_trial_mid_way(client: Any) -> Any:
    for run in trial_runs(client, "failures"):
        if is_lr(run, GOOD_LR) and run.info.status == "RUNNING" and "worker.pid" in run.data.tags:
            logged = len(train_loss_steps(client, run.info.run_id))
            if 2 * EVAL_EVERY // LOG_EVERY <= logged < STEPS // LOG_EVERY:
                return run
    return None


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp_path = tmp_path_factory.mktemp("failures")
    sweep = start_sweep_cli(tmp_path, str(write_spec(tmp_path, failing_spec(tmp_path))))
    # Found with the sweep paused (SIGSTOP to its process group, Ray's workers included), so the
    # victim cannot finish between the check and the kill; the sweep goes on after it.
    victim = wait_for_store(tmp_path, sweep, healthy_trial_mid_way, frozen=True)
    pid = int(victim.data.tags["worker.pid"])
    command = process_table()[pid][1]
    assert command.startswith("ray::"), f"worker.pid {pid} is not a Ray worker: {command!r}"
    killed_at = train_loss_steps(store_client(tmp_path), victim.info.run_id)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer or a lost node would
    os.killpg(sweep.pid, signal.SIGCONT)
    returncode = sweep.wait(timeout=300)
    return SimpleNamespace(
        tmp_path=tmp_path, returncode=returncode, text=output(tmp_path), client=store_client(tmp_path),
        victim=victim, killed_pid=pid, killed_at=killed_at,
    )


@pytest.mark.slow
def test_killed_worker_retries_in_the_same_run(failed_sweep: SimpleNamespace) -> None:
    client = failed_sweep.client
    runs = trial_runs(client, "failures")
    assert len(runs) == 2, [r.info.run_name for r in runs]
    (healthy,) = [r for r in runs if is_lr(r, GOOD_LR)]
    assert healthy.info.run_id == failed_sweep.victim.info.run_id
    assert healthy.info.status == "FINISHED", failed_sweep.text[-3000:]
    tags = healthy.data.tags
    assert tags["retries"] == "1" and "failure_reason" not in tags
    assert int(tags["worker.pid"]) != failed_sweep.killed_pid
    restored = int(tags["restored_from_step"])
    assert 0 < restored <= failed_sweep.killed_at[-1] and restored % EVAL_EVERY == 0
    assert train_loss_steps(client, healthy.info.run_id) == expected_steps(LOG_EVERY, STEPS)
    val_steps = [m.step for m in client.get_metric_history(healthy.info.run_id, names.VAL_TOP1)]
    assert val_steps == expected_steps(EVAL_EVERY, STEPS)
    # The probes too: each step once, those the retry measured again not twice, the figures at the end.
    probe_steps = [m.step for m in client.get_metric_history(healthy.info.run_id, names.outlier_frac(names.OUTPUT))]
    assert probe_steps == expected_steps(PROBE_EVERY, STEPS)
    figures = client.list_artifacts(healthy.info.run_id, names.artifact_dir(STEPS))
    assert names.NORM_HIST_FIGURE in {a.path.rsplit("/", 1)[-1] for a in figures}


@pytest.mark.slow
def test_diverging_trial_fails_with_reason_and_sweep_goes_on(failed_sweep: SimpleNamespace) -> None:
    assert failed_sweep.returncode == 1, failed_sweep.text[-3000:]
    runs = trial_runs(failed_sweep.client, "failures")
    (diverged,) = [r for r in runs if is_lr(r, DIVERGING_LR)]
    assert diverged.info.status == "FAILED"
    reason = diverged.data.tags["failure_reason"]
    assert reason.startswith("non-finite loss: loss became non-finite at step"), reason
    # max_failures: 1, so Tune retried it once, and the retry stopped before training.
    assert reason.endswith("(in an earlier attempt; not trained again)") and diverged.data.tags["retries"] == "1"
    assert "2 trials, 1 failed" in failed_sweep.text
    assert f"Trial {diverged.info.run_name} failed" in failed_sweep.text and reason in failed_sweep.text
    (parent,) = parent_runs(failed_sweep.client, "failures")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials.errored"] == "1"
