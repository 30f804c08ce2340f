"""S3 beyond the happy path: crashes, retries and reading checkpoints back, with Tune's state,
the checkpoints and MLflow's artifacts in a bucket (moto's server on loopback, reached through
AWS_ENDPOINT_URL as MinIO or AWS would be).

One sweep of two trials, one at a time, probes on at the quickstart's cadence, meets two crashes:
1. mid-way through the first trial its worker is killed (kill -9, as the OOM killer or a lost
   node would): Tune retries the trial from its last checkpoint in the bucket, in the same run;
2. mid-way through the second trial the whole sweep is killed (kill -9 of its process group) and
   the same command run again: the launch resumes from Tune's state in the bucket.
Both kills happen with the sweep paused (SIGSTOP to its process group), so the victim cannot
finish between the check and the kill. Then the analysis measures the no-register trial's final
checkpoint again (test-time registers) and `python -m orchestrator.inspect run:ID` probes it:
both download it from the bucket.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from crash_helpers import (
    expected_steps,
    kill_sweep_group,
    output,
    process_table,
    start_sweep_cli,
    store_client,
    train_loss_steps,
    trial_runs,
    wait_for_store,
)
from s3_server import moto_s3_server
from sweep_helpers import run_sweep_cli, sweep_env, tiny_spec, write_spec
from trainers.probes import names

pytestmark = pytest.mark.slow

BUCKET = "lab"
STEPS, LOG_EVERY, EVAL_EVERY, PROBE_EVERY = 160, 5, 20, 50
MID_WAY = 2 * EVAL_EVERY // LOG_EVERY  # log points of a trial that has reported two checkpoints


def object_keys(s3_client: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def trials_with_checkpoint_in_bucket(s3_client: Any) -> set[str]:
    """Trial ids whose checkpoint is in Tune's newest experiment state in the bucket, read as Tune reads it."""
    from ray.tune.experiment import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    states = [k for k in object_keys(s3_client, "sweeps/s3crash/") if k.rsplit("/", 1)[-1].startswith("experiment_state")]
    if not states:
        return set()
    body = s3_client.get_object(Bucket=BUCKET, Key=max(states))["Body"].read()
    found = set()
    for trial_json, run_metadata in _loads_with_cloudpickle(body)["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.checkpoint is not None:
            found.add(trial.trial_id)
    return found


def running_mid_way(s3_client: Any, finished: int) -> Callable[[Any], Any]:
    """Ready when `finished` trials are done and a running one has reported two checkpoints that Tune's state in the bucket holds."""

    def ready(client: Any) -> Any:
        runs = trial_runs(client, "s3crash")
        if sum(r.info.status == "FINISHED" for r in runs) != finished:
            return None
        for run in runs:
            logged = len(train_loss_steps(client, run.info.run_id))
            if run.info.status == "RUNNING" and "worker.pid" in run.data.tags and MID_WAY <= logged < STEPS // LOG_EVERY:
                if run.data.tags["trial_id"] in trials_with_checkpoint_in_bucket(s3_client):
                    return run
        return None

    return ready


@pytest.fixture(scope="module")
def s3_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import boto3

    tmp_path = tmp_path_factory.mktemp("s3crash")
    with moto_s3_server() as s3:
        env = s3.env()
        s3_client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        s3_client.create_bucket(Bucket=BUCKET)
        spec = tiny_spec(
            tmp_path, name="s3crash", max_concurrent=1, max_failures=1,
            storage=f"s3://{BUCKET}/sweeps", mlflow={"artifact_location": f"s3://{BUCKET}/mlflow"},
        )
        spec["train"].update(steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY)
        spec["train"]["probe"] = {"every": PROBE_EVERY, "batch_size": 8}  # the quickstart's cadence
        spec_path = str(write_spec(tmp_path, spec))
        sweep_env_vars = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        first = start_sweep_cli(tmp_path, spec_path, **sweep_env_vars)

        # 1. The first trial's worker dies mid-way; the sweep goes on.
        victim = wait_for_store(tmp_path, first, running_mid_way(s3_client, finished=0), timeout=400, frozen=True)
        worker = int(victim.data.tags["worker.pid"])
        assert process_table()[worker][1].startswith("ray::"), process_table()[worker]
        worker_killed_at = train_loss_steps(store_client(tmp_path), victim.info.run_id)
        os.kill(worker, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGCONT)

        # 2. Mid-way through the second trial, the whole sweep dies.
        cut_short = wait_for_store(tmp_path, first, running_mid_way(s3_client, finished=1), timeout=400, frozen=True)
        assert cut_short.info.run_id != victim.info.run_id
        sweep_killed_at = train_loss_steps(store_client(tmp_path), cut_short.info.run_id)
        kill_sweep_group(first)

        again = run_sweep_cli(tmp_path, spec_path, **env)
        assert again.returncode == 0, output(tmp_path)[-3000:] + again.stdout[-3000:] + again.stderr[-3000:]
        assert "Resuming launch 's3crash'" in again.stdout
        yield SimpleNamespace(
            tmp_path=tmp_path, env=env, s3=s3, s3_client=s3_client, client=store_client(tmp_path),
            retried=victim, worker=worker, worker_killed_at=worker_killed_at,
            resumed=cut_short, sweep_killed_at=sweep_killed_at,
        )


def complete_history(client: Any, run_id: str) -> None:
    """Every step logged once: nothing lost to the crashes, nothing written twice by the restarts."""
    assert train_loss_steps(client, run_id) == expected_steps(LOG_EVERY, STEPS)
    assert [m.step for m in client.get_metric_history(run_id, names.VAL_TOP1)] == expected_steps(EVAL_EVERY, STEPS)
    probes = [m.step for m in client.get_metric_history(run_id, names.outlier_frac(names.OUTPUT))]
    assert probes == [*expected_steps(PROBE_EVERY, STEPS), STEPS]


def test_a_trial_whose_worker_died_is_retried_from_its_checkpoint_in_the_bucket(s3_sweep: SimpleNamespace) -> None:
    client = s3_sweep.client
    run = client.get_run(s3_sweep.retried.info.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["retries"] == "1" and int(tags["worker.pid"]) != s3_sweep.worker
    restored = int(tags["restored_from_step"])
    assert 0 < restored <= s3_sweep.worker_killed_at[-1] and restored % EVAL_EVERY == 0
    complete_history(client, run.info.run_id)
    assert tags["checkpoint_uri"].startswith(f"s3://{BUCKET}/sweeps/s3crash/")


def test_a_killed_sweep_resumes_from_its_state_in_the_bucket(s3_sweep: SimpleNamespace) -> None:
    client = s3_sweep.client
    runs = trial_runs(client, "s3crash")
    assert len(runs) == 2 and {r.info.run_id for r in runs} == {s3_sweep.retried.info.run_id, s3_sweep.resumed.info.run_id}
    run = client.get_run(s3_sweep.resumed.info.run_id)
    assert run.info.status == "FINISHED"
    restored = int(run.data.tags["restored_from_step"])
    assert 0 < restored <= s3_sweep.sweep_killed_at[-1] and restored % EVAL_EVERY == 0
    complete_history(client, run.info.run_id)
    # The runs' artifacts, probe figures included, are in the bucket; nothing of the sweep is on local disk.
    keys = object_keys(s3_sweep.s3_client)
    for trial in runs:
        prefix = client.get_run(trial.info.run_id).info.artifact_uri.removeprefix(f"s3://{BUCKET}/")
        assert f"{prefix}/{names.artifact_dir(STEPS)}/{names.NORM_HIST_FIGURE}" in keys
    assert not (s3_sweep.tmp_path / "ray_results").exists()


def no_register_run(s3_sweep: SimpleNamespace) -> Any:
    (run,) = [r for r in trial_runs(s3_sweep.client, "s3crash") if r.data.tags["axis.num_registers"] == "0"]
    return run


def cli(s3_sweep: SimpleNamespace, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=s3_sweep.tmp_path, env=sweep_env(s3_sweep.tmp_path, **s3_sweep.env),
        capture_output=True, text=True, timeout=600,
    )


def test_the_analysis_measures_a_checkpoint_it_downloads_from_the_bucket(s3_sweep: SimpleNamespace) -> None:
    out = s3_sweep.tmp_path / "analysis"
    done = cli(s3_sweep, "orchestrator.analyze", "--experiment", "s3crash", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "test_time_registers.csv") as table:
        rows = list(csv.DictReader(table))
    run_id = no_register_run(s3_sweep).info.run_id
    assert [row["run_id"] for row in rows] == [run_id], rows
    assert "Test-time registers beside trained registers" in (out / "report.md").read_text()


def test_inspect_probes_a_trials_checkpoint_from_the_bucket(s3_sweep: SimpleNamespace) -> None:
    run_id = no_register_run(s3_sweep).info.run_id
    out = s3_sweep.tmp_path / "inspect"
    done = cli(s3_sweep, "orchestrator.inspect", f"run:{run_id}", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = s3_sweep.client
    inspections = [
        r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        if r.data.tags.get("sweep.role") == "inspection"
    ]
    assert [r.data.tags["inspect.trial_run"] for r in inspections] == [run_id]
    assert names.outlier_frac(names.OUTPUT) in inspections[0].data.metrics
    assert (out / "report.md").is_file()
