"""Sweeps on Ray's fake multi-node autoscaler: a head without GPU, GPU nodes from zero.

The sweep reads the autoscaler's node types from the cluster, asks the autoscaler for its
trials' GPUs (request_resources), starts trials as nodes come up (the limiter re-reads the
cluster), and clears its request at the end, so the idle nodes go away. The same for trials of
two DDP ranks (whose Tune driver holds no GPU) and for one-process trials. A trial no node type
can hold is refused before anything is written. Checkpoints go to a loopback S3, as a
multi-node cluster needs (tests/fake_cluster.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from crash_helpers import parent_runs, store_client, trial_runs
from fake_cluster import GPU_WORKER, MAX_GPU_NODES, FakeCluster, fake_cluster, start_sweep
from sweep_helpers import tiny_spec, write_spec
from trainers.probes import names

pytestmark = pytest.mark.slow

WAIT_S = 300  # bound on each wait for nodes (a cold node on a loaded 2-core machine)
TWO_RANKS = {"workers": 2, "cpu_per_worker": 1, "gpu_per_worker": 1}  # one trial per GPU node
ONE_PROCESS = {"cpu": 2, "gpu": 1}  # one trial per GPU node too (2 CPUs each)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with fake_cluster(tmp_path_factory.mktemp("fake_cluster")) as running:
        yield running


def trials_at_once(runs: list[Any]) -> int:
    """The most trial runs open at the same moment (each from its trial's start to its end)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    most = open_now = 0
    for _, change in events:
        open_now += change
        most = max(most, open_now)
    return most


def scale_spec(cluster: FakeCluster, tmp_path: Path, name: str, resources: dict[str, Any]) -> Path:
    spec = tiny_spec(tmp_path, name=name, resources=resources, storage=cluster.storage(name))
    # Long enough that the first trial still trains when the second node has come up.
    spec["train"].update(steps=40, eval_every=10, log_every=5)
    # Probes on, as the shipped specs have them: mid-way and at the end, their files in rank 0's reports.
    spec["train"]["probe"] = {"every": 20, "at_end": True, "batch_size": 8}
    return write_spec(tmp_path, spec)


@pytest.mark.parametrize("resources", [TWO_RANKS, ONE_PROCESS], ids=["two_ranks", "one_process"])
def test_trials_scale_out_on_gpu_nodes_run_at_once_and_the_nodes_go_away(
    cluster: FakeCluster, tmp_path: Path, resources: dict[str, Any]
) -> None:
    watch = cluster.watch
    watch.wait(lambda s: not s.gpu_nodes(), "no GPU node before the sweep (min_workers 0)", WAIT_S)
    name = "scale" + ("2" if "workers" in resources else "1")
    started = time.time()
    sweep = start_sweep(tmp_path, scale_spec(cluster, tmp_path, name, resources), cluster.sweep_env(tmp_path))
    try:
        returncode = sweep.wait(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    ended = time.time()
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 0, output[-5000:]
    # The node types came from the autoscaler's own config, and the plan of the cluster at full size.
    assert "Concurrency on the cluster at full size: 2 trials at once (the autoscaler's config" in output, output[-3000:]
    assert f"{GPU_WORKER} {{CPU: 2, GPU: 2}} x{MAX_GPU_NODES}" in output

    client = store_client(tmp_path)
    runs = trial_runs(client, name)
    assert len(runs) == 2 and len({r.data.tags["trial_id"] for r in runs}) == 2
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_TOP1)] == [10, 20, 30, 40]
        assert [m.step for m in client.get_metric_history(run.info.run_id, names.PROBE_SECONDS)] == [20, 40]
    (parent,) = parent_runs(client, name)
    assert parent.info.status == "FINISHED"

    most_nodes, at_once = watch.most_gpu_nodes(started, ended), trials_at_once(runs)
    assert most_nodes == MAX_GPU_NODES, watch.samples()[-5:]  # scaled from none to two GPU nodes
    assert at_once >= 2, [(r.info.start_time, r.info.end_time) for r in runs]
    # The request was cleared at the end: the idle nodes go (idle_timeout 6 s).
    gone = watch.wait(lambda s: not s.gpu_nodes(), "the idle GPU nodes to be removed", WAIT_S)
    print(
        f"\n[figures] {name}: {at_once} trials at once, {most_nodes} GPU nodes at once, "
        f"sweep {ended - started:.0f} s, nodes gone {gone.t - ended:.0f} s after it"
    )


def test_a_trial_no_node_type_can_hold_is_refused_before_launch(cluster: FakeCluster, tmp_path: Path) -> None:
    too_big = {"workers": 2, "cpu_per_worker": 1, "gpu_per_worker": 3}  # a GPU node has 2
    spec = tiny_spec(tmp_path, name="too_big", resources=too_big, storage=cluster.storage("too_big"))
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(write_spec(tmp_path, spec))],
        cwd=tmp_path, env=cluster.sweep_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: resources: one of the trial's 2 workers needs {CPU: 1, GPU: 3}, but no node of the cluster can ever hold it;"
        f" its node types (the autoscaler's config {cluster.head.temp_dir / 'autoscaling.json'}):"
        f" ray.head.default {{CPU: 1}}, {GPU_WORKER} {{CPU: 2, GPU: 2}} x{MAX_GPU_NODES}"
    ], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Nothing was written: no MLflow run, no launch record.
    client = store_client(tmp_path)
    assert client.get_experiment_by_name("too_big") is None or trial_runs(client, "too_big") == parent_runs(client, "too_big") == []
