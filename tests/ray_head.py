"""A Ray head started with `ray start --head --block` for a test, and stopped without `ray stop`.

`ray stop` ends every Ray process of the user on the machine, including other tests'
in-process clusters, so the head runs in the foreground (--block) in its own session:
SIGTERM makes it shut down what it started. Anything left over (the fake autoscaler's
worker nodes are started by the monitor, not by the head) is found by its unique temp
dir in /proc and ended by pid.

Token authentication is on, as on the shipped clusters: every head gets a random token in
its environment (`RayHead.env`), which clients (the sweep, `ray job submit`, a node that
joins) take from there; nothing is written to ~/.ray/auth_token.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from s3_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180  # a cold start on a loaded 2-core machine


@dataclass(frozen=True)
class RayHead:
    temp_dir: Path
    gcs_address: str  # host:port, what RAY_ADDRESS takes for a driver on this machine
    dashboard_url: str  # what `ray job submit --address` takes
    env: dict[str, str]  # the environment the head was started with

    def session_dirs(self) -> list[Path]:
        return sorted(p for p in self.temp_dir.glob("session_*") if p.is_dir() and not p.is_symlink())


def head_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Job entrypoints run `python` from PATH: make it this virtualenv's, as an activated one would.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PYTHONUNBUFFERED="1")
    # Token auth on, with this head's own token: not ~/.ray/auth_token, which an earlier
    # ray.init() may have written (Ray 2.60 reads RAY_AUTH_TOKEN first). Clients get this env.
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.update(extra)
    return env


@contextmanager
def ray_head(
    num_cpus: int,
    *,
    autoscaling_config: dict[str, Any] | None = None,
    env: Mapping[str, str] = {},
    node_ip: str = "127.0.0.1",
    prefix: tuple[str, ...] = (),
) -> Iterator[RayHead]:
    """A running head; with `autoscaling_config` (a fake_multinode cluster config) its
    monitor scales fake worker nodes, and the config's provider is pointed at this head.
    `prefix` runs it inside something, e.g. ("ip", "netns", "exec", NS) with `node_ip` an
    address of that namespace (tests/netns.py)."""
    # Short path: Ray's unix socket paths under it must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        *prefix, RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={node_ip}", f"--port={gcs_port}",
        f"--dashboard-host={node_ip}", f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        # Fixed defaults (52365, 8080, ...) would collide with other Ray instances on the machine.
        # (No Ray Client server: without ray[client] installed, none starts.)
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]
    if autoscaling_config is not None:
        config = copy.deepcopy(autoscaling_config)
        config["provider"]["gcs_address"] = f"{node_ip}:{gcs_port}"  # else the provider guesses <node ip>:6379
        config_path = temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(config))
        command.append(f"--autoscaling-config={config_path}")
    full_env = head_env(env)
    log = open(temp_dir / "ray_start.log", "w")
    process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(temp_dir, f"{node_ip}:{gcs_port}", f"http://{node_ip}:{dashboard_port}", full_env)
    try:
        wait_for_dashboard(head, process, prefix)
        yield head
    finally:
        stop(process, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def dashboard_answers(url: str, prefix: tuple[str, ...]) -> bool:
    """Any HTTP answer counts (401 with token auth on: the ray CLI sends the token itself)."""
    if prefix:  # in another network namespace: ask from there
        probe = "import sys, urllib.error, urllib.request\ntry: urllib.request.urlopen(sys.argv[1], timeout=5)\nexcept urllib.error.HTTPError: pass"
        return subprocess.run([*prefix, sys.executable, "-c", probe, url], capture_output=True, timeout=30).returncode == 0
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


def wait_for_dashboard(head: RayHead, process: subprocess.Popen[bytes], prefix: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited ({process.returncode}):\n{(head.temp_dir / 'ray_start.log').read_text()}")
        if dashboard_answers(f"{head.dashboard_url}/api/version", prefix):
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {head.dashboard_url} did not answer in {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen[bytes], temp_dir: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # --block: the head shuts down everything it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := processes_using(temp_dir)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 15 else signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def processes_using(temp_dir: Path) -> list[int]:
    """Pids of live processes whose command line names this head's temp dir."""
    marker = str(temp_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids
