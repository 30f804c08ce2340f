"""A node lost mid-trial, as a spot reclaim loses it, on Ray's fake multi-node autoscaler.

The node that runs the trial (for a 2-rank trial: the node of rank 0) is ended hard: its
raylet and everything it started get kill -9. Tune retries the trial; it restores its last
checkpoint from the loopback S3 on the node the autoscaler starts in its place, and goes on
in the same MLflow run with no step logged twice or missing. The sweep is frozen while the
victim is picked and killed, so the trial cannot finish in between (a trial's worker waits
at its next report until the frozen driver takes it).

Also the head's Tune driver dies during the node loss: the same command, run again, resumes
the launch, and every trial still has one run, none left RUNNING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from crash_helpers import assert_restored_near, expected_steps, kill_sweep_group, parent_runs, store_client, train_loss_steps, trial_runs, wait_for_store
from fake_cluster import FakeCluster, fake_cluster, kill_node, raylet_of, start_sweep
from sweep_helpers import tiny_spec, write_spec
from orchestrator.launch.tuner import STATE_SYNC_S
from trainers.probes import names

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY, EVAL_EVERY = 60, 2, 10  # a checkpoint every EVAL_EVERY steps
TWO_RANKS = {"workers": 2, "cpu_per_worker": 1, "gpu_per_worker": 1}
ONE_PROCESS = {"cpu": 2, "gpu": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with fake_cluster(tmp_path_factory.mktemp("fake_cluster")) as running:
        yield running


def loss_spec(cluster: FakeCluster, tmp_path: Path, name: str, resources: dict[str, Any]) -> Path:
    spec = tiny_spec(tmp_path, name=name, resources=resources, max_failures=2, storage=cluster.storage(name))
    spec["train"].update(steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY)
    # Probes on, as the shipped specs have them: mid-way and at the end.
    spec["train"]["probe"] = {"every": STEPS // 2, "at_end": True, "batch_size": 8}
    spec["grid"] = {}  # one trial
    return write_spec(tmp_path, spec)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def mid_trial(name: str) -> Any:
    def ready(client: Any) -> Any:
        """The trial's run, past two checkpoints and two before its end, its rank 0 still there.
        (Ray Train's workers report through a queue, so they may be ahead of what the store
        shows: a live rank 0 is what says the trial still trains.)"""
        for run in trial_runs(client, name):
            logged = len(train_loss_steps(client, run.info.run_id))
            if run.info.status == "RUNNING" and "worker.pid" in run.data.tags and alive(int(run.data.tags["worker.pid"])):
                if 2 * EVAL_EVERY // LOG_EVERY <= logged <= (STEPS - 2 * EVAL_EVERY) // LOG_EVERY:
                    return run
        return None

    return ready


def lose_the_node(cluster: FakeCluster, tmp_path: Path, sweep: subprocess.Popen[str], name: str) -> dict[str, Any]:
    """Freeze the sweep mid-trial, kill -9 the node of the trial's rank 0. The sweep stays frozen."""
    victim = wait_for_store(tmp_path, sweep, mid_trial(name), timeout=600, frozen=True)
    rank0 = int(victim.data.tags["worker.pid"])
    raylet = raylet_of(rank0)
    nodes_before = cluster.watch.gpu_nodes_seen()
    written = train_loss_steps(store_client(tmp_path), victim.info.run_id)  # what the driver wrote to MLflow
    killed_at, killed = kill_node(raylet)
    assert rank0 in killed
    return {"run": victim, "rank0": rank0, "killed_at": killed_at, "killed": killed, "written": written, "nodes_before": nodes_before}


def check_resumed(cluster: FakeCluster, tmp_path: Path, name: str, loss: dict[str, Any]) -> dict[str, float]:
    """The trial resumed from its last checkpoint in its one run, on a new node; the figures."""
    client = store_client(tmp_path)
    (run,) = trial_runs(client, name)
    assert run.info.run_id == loss["run"].info.run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert int(tags["retries"]) >= 1 and "failure_reason" not in tags, tags
    assert int(tags["worker.pid"]) not in loss["killed"]  # rank 0 of the last attempt ran elsewhere
    restored = int(tags["restored_from_step"])
    last_written = loss["written"][-1]
    assert_restored_near(restored, last_written, EVAL_EVERY, STEPS)
    history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
    assert [m.step for m in history] == expected_steps(LOG_EVERY, STEPS)  # none twice, none missing
    assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_TOP1)] == expected_steps(EVAL_EVERY, STEPS)
    # Probed at both points (the mid-way one again if the restore went back past it).
    assert {m.step for m in client.get_metric_history(run.info.run_id, names.PROBE_SECONDS)} == {STEPS // 2, STEPS}
    # The autoscaler replaced the node: a GPU node that was not there before the kill.
    assert cluster.watch.gpu_nodes_seen(since=loss["killed_at"]) - loss["nodes_before"]
    running_again = min(m.timestamp for m in history if m.step > restored) / 1000
    return {
        "restored": restored,
        "last_written": last_written,
        "resume_s": running_again - loss["killed_at"],
    }


@pytest.mark.parametrize("resources", [ONE_PROCESS, TWO_RANKS], ids=["one_process", "two_ranks"])
def test_a_lost_node_costs_the_steps_since_the_last_checkpoint(
    cluster: FakeCluster, tmp_path: Path, resources: dict[str, Any]
) -> None:
    name = "lost" + ("2" if "workers" in resources else "1")
    started = time.time()
    sweep = start_sweep(tmp_path, loss_spec(cluster, tmp_path, name, resources), cluster.sweep_env(tmp_path))
    try:
        loss = lose_the_node(cluster, tmp_path, sweep, name)
        os.killpg(sweep.pid, signal.SIGCONT)
        returncode = sweep.wait(timeout=900)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 0, output[-5000:]
    figures = check_resumed(cluster, tmp_path, name, loss)
    cluster.watch.wait(lambda s: not s.gpu_nodes(), "the idle GPU nodes to be removed", 300)
    print(
        f"\n[figures] {name}: node killed after the driver wrote step {figures['last_written']}, restored from"
        f" {figures['restored']} (checkpoint every {EVAL_EVERY} steps), running again {figures['resume_s']:.0f} s"
        f" after the kill; test {time.time() - started:.0f} s"
    )


def test_the_driver_dies_during_a_node_loss_and_the_same_command_resumes(cluster: FakeCluster, tmp_path: Path) -> None:
    name = "lostdriver"
    spec_path = loss_spec(cluster, tmp_path, name, ONE_PROCESS)
    # Tune's experiment state (with the trial's last checkpoint) uploaded every second.
    env = cluster.sweep_env(tmp_path, TUNE_GLOBAL_CHECKPOINT_S="1")
    started = time.time()
    sweep = start_sweep(tmp_path, spec_path, env)
    try:
        loss = lose_the_node(cluster, tmp_path, sweep, name)
    finally:
        kill_sweep_group(sweep)  # the driver dies too, while the node is being lost
    again = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"Resuming launch '{name}'" in again.stdout
    client = store_client(tmp_path)
    (run,) = trial_runs(client, name)  # one run per trial, across the two drivers
    assert run.info.run_id == loss["run"].info.run_id and run.info.status == "FINISHED"
    assert train_loss_steps(client, run.info.run_id) == expected_steps(LOG_EVERY, STEPS)
    (parent,) = parent_runs(client, name)
    assert parent.info.status == "FINISHED"
    experiment = client.get_experiment_by_name(name)
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []
    cluster.watch.wait(lambda s: not s.gpu_nodes(), "the idle GPU nodes to be removed", 300)
    print(
        f"\n[figures] {name}: node and driver killed after the driver wrote step {loss['written'][-1]}, restored from"
        f" {run.data.tags.get('restored_from_step', 'step 0')} (the checkpoint in Tune's state on storage, uploaded every"
        f" {STATE_SYNC_S} s: this trial checkpoints within seconds of its start); test {time.time() - started:.0f} s"
    )
