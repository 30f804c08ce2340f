"""Crash-safe resume: kill -9 the whole sweep mid-way, run the same command again.

The sweep uses the per-cell Optuna searcher, so the restore also brings back the
searcher (pickled in Tune's state) along with our MLflow callback and the trainable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from crash_helpers import (
    expected_steps,
    kill_sweep_group,
    output,
    parent_runs,
    start_sweep_cli,
    store_client,
    survivors,
    train_loss_steps,
    trial_runs,
    wait_for_store,
)
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec
from trainers.probes import names

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY, EVAL_EVERY, TRIALS = 240, 5, 40, 3
PROBE_EVERY = 50  # the quickstart's cadence
# Kill once the running trial is past a few checkpoints and Tune's saved state (uploaded
# every second here, TUNE_GLOBAL_CHECKPOINT_S; more often starves the driver on a busy
# machine) records one of them for the restore. A trial takes a few seconds, so the check
# is repeated with the sweep frozen (SIGSTOP) and the sweep is killed frozen.
KILL_AFTER_LOGGED = 3 * EVAL_EVERY // LOG_EVERY


def resume_spec(tmp_path: Path) -> dict[str, Any]:
    spec = tiny_spec(tmp_path, name="resume", max_concurrent=1, max_failures=1)
    spec["train"].update(steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY)
    spec["train"]["probe"] = {"every": PROBE_EVERY, "batch_size": 8}  # on, at the quickstart's cadence
    spec["grid"] = {"model.num_registers": [1]}
    spec["search"] = {
        "num_samples": TRIALS,
        "metric": "val/top1",
        "mode": "max",
        "space": {"optim.lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
    }
    return spec


def trials_with_saved_checkpoint(launch_folder: Path) -> set[str]:
    """Trial ids whose checkpoint is in Tune's newest saved experiment state (read as Tune reads it)."""
    from ray.tune.experiment import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    state = _loads_with_cloudpickle(max(launch_folder.glob("experiment_state-*.json")).read_bytes())
    found = set()
    for trial_json, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.checkpoint is not None:
            found.add(trial.trial_id)
    return found


def finished_and_interrupted(launch_folder: Path) -> Callable[[Any], tuple[Any, Any] | None]:
    def ready(client: Any) -> tuple[Any, Any] | None:
        """A finished trial run and a running one that has logged part of its history."""
        runs = trial_runs(client, "resume")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING"]
        for run in running:
            logged = len(train_loss_steps(client, run.info.run_id))
            if finished and KILL_AFTER_LOGGED <= logged < STEPS // LOG_EVERY:
                if run.data.tags["trial_id"] in trials_with_saved_checkpoint(launch_folder):
                    return finished[0], run
        return None

    return ready


def test_killed_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    spec_path = str(write_spec(tmp_path, resume_spec(tmp_path)))
    launch_folder = tmp_path / "ray_results" / "resume"
    first = start_sweep_cli(tmp_path, spec_path, TUNE_GLOBAL_CHECKPOINT_S="1")
    done_before, cut_short = wait_for_store(tmp_path, first, finished_and_interrupted(launch_folder), frozen=True)
    started = kill_sweep_group(first)

    # Ray's raylet, GCS and trial workers were started by ray.init() in the driver; none may outlive it.
    ray_processes = {pid: args for pid, args in started.items() if "ray" in args}
    assert ray_processes, f"expected Ray processes under the driver, found {started}"
    assert survivors(started) == {}, "processes outlived kill -9 of the sweep's process group"

    client = store_client(tmp_path)
    before = {r.info.run_id: r for r in trial_runs(client, "resume")}
    cut_short_steps = train_loss_steps(client, cut_short.info.run_id)
    done_before_steps = train_loss_steps(client, done_before.info.run_id)

    # Tune copies its state files to the launch folder in a background thread, not atomically;
    # a kill during that copy leaves one torn (orchestrator/launch/tune_state.py). Tear it here so the
    # resume always has to mend it from Tune's staging copy.
    state_file = max(launch_folder.glob("experiment_state-*.json"))
    state_file.write_bytes(state_file.read_bytes()[:100])

    again = run_sweep_cli(tmp_path, spec_path)
    assert again.returncode == 0, output(tmp_path)[-3000:] + again.stdout[-3000:] + again.stderr[-3000:]
    assert "Resuming launch 'resume'" in again.stdout
    assert f"Tune's saved {state_file.name}" in again.stdout and "torn" in again.stdout
    assert "Failed to restore" not in again.stdout + again.stderr

    runs = trial_runs(client, "resume")
    assert len(runs) == TRIALS, [r.info.run_name for r in runs]
    assert set(before) <= {r.info.run_id for r in runs}, "a trial opened a second run"
    assert len({r.data.tags["trial_id"] for r in runs}) == TRIALS
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        run_id = run.info.run_id
        assert train_loss_steps(client, run_id) == expected_steps(LOG_EVERY, STEPS), run.info.run_name
        val_steps = [m.step for m in client.get_metric_history(run_id, names.VAL_LOSS)]
        assert val_steps == expected_steps(EVAL_EVERY, STEPS), run.info.run_name
        # Probes without gaps or repeats across the kill, and the final figures.
        probe_steps = [m.step for m in client.get_metric_history(run_id, names.outlier_frac(names.OUTPUT))]
        assert probe_steps == [*expected_steps(PROBE_EVERY, STEPS), STEPS], run.info.run_name
        figures = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, names.artifact_dir(STEPS))}
        assert names.NORM_HIST_FIGURE in figures, run.info.run_name

    # The finished trial was not trained again: same end time, same history.
    after = {r.info.run_id: r for r in runs}
    assert after[done_before.info.run_id].info.end_time == done_before.info.end_time
    assert train_loss_steps(client, done_before.info.run_id) == done_before_steps
    # The interrupted trial continued its own run from one of its checkpoints.
    assert cut_short_steps == expected_steps(LOG_EVERY, STEPS)[: len(cut_short_steps)]
    restored = int(after[cut_short.info.run_id].data.tags["restored_from_step"])
    assert 0 < restored < STEPS and restored % EVAL_EVERY == 0
    assert "restored_from_step" not in after[done_before.info.run_id].data.tags

    (parent,) = parent_runs(client, "resume")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["trials.total"] == str(TRIALS)

    # A finished launch is left alone, with a message that says what to do.
    third = run_sweep_cli(tmp_path, spec_path)
    assert third.returncode == 2
    assert "already finished" in third.stderr and "--launch" in third.stderr
