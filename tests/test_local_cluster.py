"""The README's local-cluster recipe, run as written on a machine where a token file exists.

The commands are read from the README's "Try the cluster path locally" block and run in one
bash shell from the repository root, with ~/.ray/auth_token present (as an earlier ray.init
leaves it) and token authentication not disabled anywhere. Only the environment differs from a
user's shell: a HOME of its own holding that token, free ports and a temp dir for the head
(LOCAL_RAY_*, so that it cannot collide with other Ray instances on the machine), the MLflow
store in tmp_path, and RAY_API_SERVER_ADDRESS, which points `ray job` at this head (on a
machine with one Ray head it finds it alone; here other tests may run theirs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from s3_server import free_port
from sweep_helpers import ROOT

pytestmark = pytest.mark.slow

SECTION = "## Try the cluster path locally"
STOP = "infra/local_cluster.sh stop"


def recipe() -> list[str]:
    """The commands of the README block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def recipe_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what ray.init leaves behind
    dropped = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    dashboard_port = free_port()
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # an activated venv
        LOCAL_RAY_PORT=str(free_port()),
        LOCAL_RAY_DASHBOARD_PORT=str(dashboard_port),
        # Short: Ray's unix socket paths under it must stay below 108 characters.
        LOCAL_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="rl", dir="/tmp"),
        LOCAL_RAY_NUM_CPUS="2",
        LOCAL_RAY_ARGS=" ".join(
            f"--{option}={free_port()}"
            for option in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                           "metrics-export-port", "node-manager-port", "object-manager-port")
        ),
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def bash(script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_readme_recipe_runs_a_sweep_on_a_local_head_with_token_auth(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    commands = recipe()
    assert commands[0] == "infra/local_cluster.sh start" and commands[-1] == STOP, commands
    assert not any("RAY_AUTH_MODE=disabled" in c for c in commands)
    env = recipe_env(tmp_path)
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text()
    try:
        done = bash("\n".join(commands[:-1]), env, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "succeeded" in output, output[-6000:]
        assert "SUCCEEDED" in done.stdout, output[-3000:]  # `ray job list`

        # Token authentication was on: the job API refuses a request without the token file's token.
        version = f"{env['RAY_API_SERVER_ADDRESS']}/api/version"
        assert status(version) == 401
        assert status(version, token) == 200
    finally:
        stopped = bash(STOP, env, timeout=180)  # the README's last line
        shutil.rmtree(env["LOCAL_RAY_TEMP_DIR"], ignore_errors=True)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["axis.num_registers"] for r in trials) == ["0", "4"]
    assert all(r.info.status == "FINISHED" for r in trials)


def test_the_in_process_cluster_keeps_token_auth_and_writes_no_token_file(tmp_path: Path) -> None:
    """The sweep's own ray.init: token authentication on, ~/.ray/auth_token never written."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    code = (
        "import json, os, ray\n"
        "from orchestrator.launch.run import init_ray\n"
        "assert init_ray()\n"
        "worker_env = ray.get(ray.remote(lambda: (os.environ.get('RAY_AUTH_MODE'), bool(os.environ.get('RAY_AUTH_TOKEN')))).remote())\n"
        "ray.shutdown()\n"
        "print(json.dumps({'driver': os.environ.get('RAY_AUTH_MODE'), 'worker': worker_env}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"driver": "token", "worker": ["token", True]}
    assert not (tmp_path / ".ray" / "auth_token").exists()
