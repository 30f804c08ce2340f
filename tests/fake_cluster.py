"""Ray's fake multi-node autoscaler for the tests: the cluster config, the head, a loopback S3
for checkpoints, and the node losses a spot cloud inflicts (kill -9 of a node's raylet and
everything it started).

`ray.cluster_utils.AutoscalingCluster` needs fake_multi_node/example.yaml, which the Ray
2.60 wheel does not ship, and it runs `ray stop --force` (which would end every Ray on the
machine); so the full cluster config is written here and the head started as
AutoscalingCluster does (RAY_FAKE_CLUSTER=1, `ray start --head --autoscaling-config=...`,
tests/ray_head.py). The GPUs are resource labels: the trials see no CUDA device and train on
the CPU, and multi-worker trials use gloo (orchestrator/trials/process_group.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cluster_watch import Watch, watching
from crash_helpers import descendants, process_table
from ray_head import RayHead, ray_head
from s3_server import S3Endpoint, moto_s3_server
from sweep_helpers import sweep_env

GPU_WORKER = "gpu_worker"
GPU_NODE = {"CPU": 2, "GPU": 2}  # one 2-rank trial (1 CPU, 1 GPU per rank) or one {cpu: 2, gpu: 1} trial per node
MAX_GPU_NODES = 2
IDLE_TIMEOUT_S = 6
BUCKET = "fake-cluster"

# Faster than Ray's defaults, so that a lost node costs the tests seconds, not minutes:
# the GCS declares a node dead after 3 failed health checks a second apart (5 s each at most,
# generous on a loaded 2-core machine), and the autoscaler replaces a node whose heartbeat
# is 10 s old (Ray's default 30 s).
FAST_FAILURE_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "3",
    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",
}


def fake_cluster_config(max_gpu_nodes: int = MAX_GPU_NODES) -> dict[str, Any]:
    """A complete cluster config: the monitor validates it but fills in no defaults."""
    return {
        "cluster_name": "fake-gpu",
        "max_workers": max_gpu_nodes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,  # all the nodes one update asks for, not one per update
        },
        "available_node_types": {
            # The head runs the Tune driver's bookkeeping only: no GPU, so no GPU trial fits there.
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_WORKER: {
                "resources": {**GPU_NODE, "object_store_memory": 128 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_nodes,
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


@dataclass(frozen=True)
class FakeCluster:
    head: RayHead
    s3: S3Endpoint
    watch: Watch  # the alive nodes, once a second (tests/cluster_watch.py)

    def sweep_env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        """A sweep driver that joins this cluster, with its token, and reaches the S3 server."""
        auth = {k: v for k, v in self.head.env.items() if k.startswith("RAY_AUTH")}
        return sweep_env(tmp_path, RAY_ADDRESS=self.head.gcs_address, **auth, **self.s3.env(), **extra)

    def storage(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"


@contextmanager
def fake_cluster(work: Path) -> Iterator[FakeCluster]:
    """S3 first: the head's environment, which the fake nodes inherit, carries its address and
    keys, as a real node has its instance role (the sweep never hands keys to trial workers)."""
    import boto3

    with moto_s3_server() as s3:
        boto3.client("s3", endpoint_url=s3.url, **_keys(s3)).create_bucket(Bucket=BUCKET)
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **FAST_FAILURE_ENV, **s3.env()}
        with ray_head(num_cpus=1, autoscaling_config=fake_cluster_config(), env=env) as head:
            with watching(head.dashboard_url, head.env, work / "nodes.jsonl") as watch:
                yield FakeCluster(head, s3, watch)


def _keys(s3: S3Endpoint) -> dict[str, str]:
    env = s3.env()
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


def start_sweep(tmp_path: Path, spec_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """The sweep CLI in a session of its own (its group can be frozen and killed), output to sweep.out."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", str(spec_path)],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "sweep.out", "a"), stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def raylet_of(pid: int) -> int:
    """The raylet of the node a Ray worker process runs on: the raylet starts its workers."""
    parent = process_table()[pid][0]
    program = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0]
    assert program.endswith(b"/raylet"), f"the parent of worker {pid} is no raylet: {program!r}"
    return parent


def kill_node(raylet: int) -> tuple[float, dict[int, str]]:
    """kill -9 a node's raylet and every process it started (its workers and agents), as a
    spot reclaim ends a machine. Returns the time of the kill and what was killed."""
    victims = {raylet: process_table()[raylet][1], **descendants(raylet)}
    for pid in victims:  # all stopped first, so none reacts to another's death before its own
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    killed_at = time.time()
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed_at, victims
