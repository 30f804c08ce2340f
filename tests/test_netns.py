"""Two Ray nodes on real network interfaces, and a network partition mid-trial.

A Ray head in one network namespace and a worker node in another, joined by a veth pair whose
addresses exist only inside them (tests/netns.py). Each offers 1 CPU, so a 2-rank trial puts
one rank on each: DDP's gloo traffic crosses the link. The sweep's driver, the MLflow store
(a SQLite file only the driver writes) and the S3 server for checkpoints (moto, serving on the
head's address) live in the head's namespace, where a driver of `ray job submit` lives.

Mid-trial the link goes down, as a partition would take it. The head declares the node dead
(Ray's health checks, made faster here); the Train run fails and Tune retries the trial, which
waits: with one node left, 2 ranks do not fit. Then the link comes back. Which way the trial
resumes: on the same node, once the link is back. This cluster has no third machine to move
to, and a partition that heals is what a network blip is. A raylet that the GCS declared dead
does not rejoin (it exits when it hears so); the node's supervisor starts Ray on it again, as
systemd's Restart= or KubeRay's container restart would, and the trial resumes from its last
checkpoint across the link, in the same MLflow run, with no step lost or logged twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cluster_watch import Sample, watching
from crash_helpers import assert_restored_near, expected_steps, store_client, train_loss_steps, trial_runs, wait_for_store
from fake_cluster import FAST_FAILURE_ENV
from netns import Link, Namespace, linked_namespaces, netns_unavailable
from ray_head import RAY, RayHead, ray_head
from s3_server import free_port
from sweep_helpers import sweep_env, tiny_spec, write_spec
from trainers.probes import names

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY, EVAL_EVERY = 60, 2, 10
BUCKET = "netns"
KEYS = {"AWS_ACCESS_KEY_ID": "testing-access-key", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}
HOLD_S = 5  # the link stays down this long after the head declared the node dead


@pytest.fixture
def link() -> Iterator[Link]:
    why = netns_unavailable()
    if why:
        pytest.skip(f"network namespaces are needed for nodes on real interfaces: {why}")
    with linked_namespaces() as made:
        yield made


def in_namespace(ns: Namespace, code: str, env: dict[str, str]) -> None:
    subprocess.run([*ns.prefix, sys.executable, "-c", code], env=env, check=True, timeout=120, capture_output=True)


def s3_in(ns: Namespace, tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's S3 server on the head namespace's address, with a bucket; the variables to reach it."""
    port = free_port()
    server = subprocess.Popen(
        [*ns.prefix, sys.executable, "-m", "moto.server", "-H", ns.address, "-p", str(port)],
        stdout=open(tmp_path / "moto.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    env = {**KEYS, "AWS_ENDPOINT_URL": f"http://{ns.address}:{port}"}
    code = (
        "import time, boto3\nfor _ in range(120):\n    try:\n"
        "        boto3.client('s3').create_bucket(Bucket='%s'); break\n"
        "    except Exception:\n        time.sleep(1)\nelse:\n    raise SystemExit('no S3 server')" % BUCKET
    )
    in_namespace(ns, code, {**os.environ, **env})
    return server, env


def node_supervisor(link: Link, head: RayHead, env: dict[str, str], tmp_path: Path, temp_dir: str) -> subprocess.Popen[bytes]:
    """Ray on the node namespace, started again whenever it ends (systemd's Restart=always)."""
    start = (
        f"{RAY} start --block --disable-usage-stats --address={head.gcs_address}"
        f" --node-ip-address={link.node.address} --num-cpus=1 --num-gpus=0 --temp-dir={temp_dir}"
    )
    loop = f"while true; do {start}; echo \"ray start ended ($?); starting it again\"; sleep 1; done"
    return subprocess.Popen(
        [*link.node.prefix, "bash", "-c", loop], env={**head.env, **env, "GLOO_SOCKET_IFNAME": link.node.device},
        stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def node_ids_at(sample: Sample, address: str) -> set[str]:
    return {node_id for node_id, node in sample.nodes.items() if node["ip"] == address}


def mid_trial(client: Any) -> Any:
    for run in trial_runs(client, "netns"):
        logged = len(train_loss_steps(client, run.info.run_id))
        if run.info.status == "RUNNING" and 2 * EVAL_EVERY // LOG_EVERY <= logged <= (STEPS - 2 * EVAL_EVERY) // LOG_EVERY:
            return run
    return None


def stop_group(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_a_partition_mid_trial_resumes_the_trial_across_the_link_once_it_heals(link: Link, tmp_path: Path) -> None:
    started = time.time()
    s3, s3_env = s3_in(link.head, tmp_path)
    node_temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths stay under 108 characters
    node = sweep = None
    try:
        # gloo finds its own address by the host name, which resolves to loopback here: each node names
        # its link device instead (as on a machine with several interfaces).
        head_env = {**FAST_FAILURE_ENV, **s3_env, "GLOO_SOCKET_IFNAME": link.head.device}
        with ray_head(num_cpus=1, node_ip=link.head.address, prefix=link.head.prefix, env=head_env) as head:
            node = node_supervisor(link, head, s3_env, tmp_path, node_temp)
            with watching(head.dashboard_url, head.env, tmp_path / "nodes.jsonl", prefix=link.head.prefix) as watch:
                first = watch.wait(lambda s: node_ids_at(s, link.node.address), "the node to join the head across the link")
                (node_id,) = node_ids_at(first, link.node.address)

                spec = tiny_spec(tmp_path, name="netns", max_failures=2, storage=f"s3://{BUCKET}/netns",
                                 resources={"workers": 2, "cpu_per_worker": 1})  # 1 CPU per node: a rank on each
                spec["train"].update(steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY)
                # Probes on, as the shipped specs have them: mid-way and at the end.
                spec["train"]["probe"] = {"every": STEPS // 2, "at_end": True, "batch_size": 8}
                spec["grid"] = {}
                env = sweep_env(tmp_path, RAY_ADDRESS=head.gcs_address, **{k: v for k, v in head.env.items() if k.startswith("RAY_AUTH")}, **s3_env)
                sweep = subprocess.Popen(
                    [*link.head.prefix, sys.executable, "-m", "orchestrator.sweep", str(write_spec(tmp_path, spec))],
                    cwd=tmp_path, env=env, stdout=open(tmp_path / "sweep.out", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                )
                victim = wait_for_store(tmp_path, sweep, mid_trial, timeout=600, frozen=True)
                written = train_loss_steps(store_client(tmp_path), victim.info.run_id)  # what the driver wrote to MLflow
                link.set(up=False)
                cut_at = time.time()
                os.killpg(sweep.pid, signal.SIGCONT)
                dead = watch.wait(lambda s: node_id not in s.nodes, "the head to declare the cut-off node dead", 300)
                time.sleep(HOLD_S)
                link.set(up=True)
                healed_at = time.time()
                back = watch.wait(lambda s: node_ids_at(s, link.node.address) - {node_id}, "Ray on the node to join again", 300)
                returncode = sweep.wait(timeout=900)
    finally:
        for process in (sweep, node, s3):
            if process is not None:
                stop_group(process)
        shutil.rmtree(node_temp, ignore_errors=True)
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 0, output[-5000:]

    client = store_client(tmp_path)
    (run,) = trial_runs(client, "netns")
    assert run.info.run_id == victim.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["retries"]) >= 1 and "failure_reason" not in run.data.tags
    restored = int(run.data.tags["restored_from_step"])
    assert_restored_near(restored, written[-1], EVAL_EVERY, STEPS)
    history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
    assert [m.step for m in history] == expected_steps(LOG_EVERY, STEPS)  # none twice, none missing
    assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_TOP1)] == expected_steps(EVAL_EVERY, STEPS)
    # Probed at both points (the mid-way one again if the restore went back past it).
    assert {m.step for m in client.get_metric_history(run.info.run_id, names.PROBE_SECONDS)} == {STEPS // 2, STEPS}
    # The resumed attempt trained only once the node was back: its 2 ranks need both nodes.
    running_again = min(m.timestamp for m in history if m.step > restored) / 1000
    assert running_again >= back.t - 1
    print(
        f"\n[figures] netns: link down {healed_at - cut_at:.0f} s (node declared dead {dead.t - cut_at:.0f} s after"
        f" the cut); Ray back on the node {back.t - healed_at:.0f} s after the link; trial running again"
        f" {running_again - cut_at:.0f} s after the cut, restored from step {restored} (last step the"
        f" driver wrote: {written[-1]}, checkpoint every {EVAL_EVERY}); test {time.time() - started:.0f} s"
    )
