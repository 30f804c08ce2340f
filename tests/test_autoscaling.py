"""GPU workers scale up for a sweep and go away when idle, on Ray's fake multi-node provider.

`ray.cluster_utils.AutoscalingCluster` needs fake_multi_node/example.yaml, which the Ray
2.60 wheel does not ship, and it runs `ray stop --force` (which would end every Ray on the
machine); so this writes the full cluster config itself and starts the head as
AutoscalingCluster does (RAY_FAKE_CLUSTER=1, `ray start --head --autoscaling-config=...`).
The GPU is a resource label: the trials see no CUDA device and train on the CPU.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ray_head import RayHead, ray_head
from sweep_helpers import sweep_env, tiny_spec, write_spec

pytestmark = pytest.mark.slow

GPU_WORKER = "gpu_worker"
IDLE_TIMEOUT_S = 6
WAIT_S = 300  # bound on each wait below (a cold worker node on a loaded 2-core machine)


def fake_cluster_config() -> dict[str, Any]:
    """A complete cluster config: the monitor validates it but fills in no defaults."""
    return {
        "cluster_name": "fake-gpu",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            # The head runs the Tune driver's bookkeeping only: no GPU, so no trial fits there.
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_WORKER: {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 128 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def cluster() -> Iterator[RayHead]:
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with ray_head(num_cpus=1, autoscaling_config=fake_cluster_config(), env=env) as head:
        yield head


def alive_gpu_nodes(head: RayHead) -> list[str]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=head.dashboard_url, detail=True, raise_on_missing_output=False)
    return [n.node_id for n in nodes if n.state == "ALIVE" and n.resources_total.get("GPU", 0) > 0]


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting {WAIT_S} s for {what}")
        time.sleep(1)


def test_gpu_workers_scale_up_for_trials_and_down_when_idle(cluster: RayHead, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert alive_gpu_nodes(cluster) == []  # min_workers 0: nothing runs before there is work

    spec = tiny_spec(tmp_path, resources={"cpu": 1, "gpu": 1})
    env = sweep_env(tmp_path, RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE=cluster.env["RAY_AUTH_MODE"])
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.sweep", str(write_spec(tmp_path, spec))],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        seen: set[str] = set()
        most_at_once = 0
        try:
            while sweep.poll() is None:
                alive = alive_gpu_nodes(cluster)
                seen.update(alive)
                most_at_once = max(most_at_once, len(alive))
                time.sleep(1)
        finally:
            if sweep.poll() is None:
                sweep.kill()
            sweep.wait()
    output = (tmp_path / "sweep.log").read_text()
    assert sweep.returncode == 0, output[-5000:]
    # Scaled up from none while trials waited, never past max_workers (a node that idles
    # between the two trials may be replaced, so more than two distinct nodes can appear).
    assert seen and 1 <= most_at_once <= 2, (seen, most_at_once)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep.role") == "trial"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)

    wait_for(lambda: alive_gpu_nodes(cluster) == [], "the idle GPU workers to be removed")
