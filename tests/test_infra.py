"""Checks on infra/: cluster configs against their schemas and our safety invariants,
IAM policies, and the MLflow server script's defaults (loopback, auth, stop)."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

INFRA = Path(__file__).resolve().parents[1] / "infra"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
KUBERAY_CLUSTER = INFRA / "kuberay" / "raycluster.yaml"
BUCKET_POLICY = INFRA / "iam" / "bucket-policy.json"
SERVE = INFRA / "mlflow" / "serve.sh"
# Ports that must never be reachable from outside: Ray GCS, dashboard/job API, client, MLflow.
PRIVATE_PORTS = {6379, 8265, 10001, 5000}
WORLD = {"0.0.0.0/0", "::/0"}
# Shapes of static AWS credentials that must never be committed.
STATIC_KEY = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]")


def _load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


# --- AWS cluster launcher -------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_config() -> dict[str, Any]:
    return _load_yaml(AWS_CLUSTER)


def test_aws_cluster_passes_rays_own_validation(aws_config: dict[str, Any]) -> None:
    # What `ray up` does before touching AWS: merge defaults, then check ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(aws_config)))


def test_rays_validation_rejects_a_broken_copy(aws_config: dict[str, Any]) -> None:
    broken = copy.deepcopy(aws_config)
    broken["available_node_types"]["head.cpu"]["min_wrokers"] = 0
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_aws_head_takes_no_trials(aws_config: dict[str, Any]) -> None:
    head = aws_config["available_node_types"][aws_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def test_aws_gpu_workers_scale_from_zero_on_spot_with_on_demand_fallback(
    aws_config: dict[str, Any],
) -> None:
    workers = _gpu_types(aws_config)
    assert workers, "no worker node types"
    spot, on_demand = [], []
    for name, node in workers.items():
        assert node.get("min_workers", 0) == 0, f"{name} keeps GPUs running while idle"
        assert node["node_config"]["InstanceType"].split(".")[0][0] in "gp", name
        market = node["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        (spot if market == "spot" else on_demand).append(name)
    assert spot and on_demand, f"spot types {spot}, on-demand fallback {on_demand}"
    assert aws_config["idle_timeout_minutes"] > 0
    # Spot nodes cannot be stopped, so stopped-node reuse must be off.
    assert aws_config["provider"]["cache_stopped_nodes"] is False


def test_aws_nodes_use_instance_profiles_and_no_static_keys(aws_config: dict[str, Any]) -> None:
    for name, node in aws_config["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], name
    for path in [AWS_CLUSTER, INFRA / "aws" / "mlflow_env.sh", KUBERAY_CLUSTER]:
        assert not STATIC_KEY.search(path.read_text()), f"static AWS key material in {path}"


def test_aws_opens_no_private_port_to_the_world(aws_config: dict[str, Any]) -> None:
    rules = aws_config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])}
        cidrs |= {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        if rule.get("IpProtocol") == "-1":
            ports = PRIVATE_PORTS
        assert not (cidrs & WORLD and ports & PRIVATE_PORTS), f"world-open rule {rule}"
    head_start = " ".join(aws_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-host=0.0.0.0" not in head_start


def test_aws_setup_installs_the_project(aws_config: dict[str, Any]) -> None:
    setup = " ".join(aws_config["setup_commands"])
    assert "pip install" in setup and "-e /home/ray/vit-register-sweeps" in setup
    assert aws_config["file_mounts"]["/home/ray/vit-register-sweeps"] == "."


def test_aws_turns_on_rays_token_auth_on_every_node(aws_config: dict[str, Any]) -> None:
    # RAY_AUTH_MODE for every process of every container, the token on disk before each `ray start`.
    assert "--env RAY_AUTH_MODE=token" in aws_config["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(aws_config[key])
        assert start.index("infra/aws/ray_auth_token.sh") < start.index("ray start"), key
    script = (INFRA / "aws" / "ray_auth_token.sh").read_text()
    assert "/vit-register-sweeps/ray-auth-token" in script and ".ray/auth_token" in script and "umask 077" in script
    subprocess.run(["bash", "-n", str(INFRA / "aws" / "ray_auth_token.sh")], check=True)
    policy = json.loads((INFRA / "iam" / "mlflow-secret-policy.json").read_text())
    assert any(s["Resource"].endswith(":parameter/vit-register-sweeps/ray-auth-token") for s in policy["Statement"])


def test_aws_gpu_types_state_what_the_plan_counts(aws_config: dict[str, Any]) -> None:
    # `--dry-run --cluster` counts trials from these (the autoscaler would detect them at launch).
    for name, node in _gpu_types(aws_config).items():
        assert node["resources"].get("CPU", 0) > 0 and node["resources"].get("GPU", 0) > 0, name


# --- KubeRay --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay() -> dict[str, Any]:
    return _load_yaml(KUBERAY_CLUSTER)


def test_kuberay_cluster_autoscales_gpu_workers_from_zero(kuberay: dict[str, Any]) -> None:
    assert kuberay["apiVersion"] == "ray.io/v1"
    assert kuberay["kind"] == "RayCluster"
    spec = kuberay["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in group["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] > 0
        tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated


def _walk(node: Any, key: str = "") -> Any:
    """Every (key, value) pair in a parsed manifest, at any depth."""
    if isinstance(node, dict):
        for child_key, child in node.items():
            yield child_key, child
            yield from _walk(child, child_key)
    elif isinstance(node, list):
        for child in node:
            yield from _walk(child, key)


def test_kuberay_exposes_nothing_outside_the_cluster(kuberay: dict[str, Any]) -> None:
    assert kuberay["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for key, value in _walk(kuberay):
        if key in ("serviceType", "type"):
            assert value not in ("LoadBalancer", "NodePort"), f"{key}: {value}"
        assert not (key in ("hostNetwork", "hostPort") and value), f"{key}: {value}"


def test_kuberay_turns_on_rays_token_auth(kuberay: dict[str, Any]) -> None:
    # KubeRay 1.5.1+: the operator makes the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every pod.
    assert kuberay["spec"]["authOptions"] == {"mode": "token"}
    assert int(kuberay["spec"]["rayVersion"].split(".")[1]) >= 52


def test_kuberay_custom_commands_keep_the_generated_ray_start(kuberay: dict[str, Any]) -> None:
    # With our own container command, KubeRay only runs it if told so, and it must still
    # end with the ray start command KubeRay generated.
    assert kuberay["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = kuberay["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(container.get("args", []))
            for env in container.get("env", []):
                if "PASSWORD" in env["name"]:
                    assert "valueFrom" in env, f"{env['name']} must come from a Secret"


# --- IAM ------------------------------------------------------------------------------


def _statements(path: Path) -> list[dict[str, Any]]:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17", path
    return policy["Statement"]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@pytest.mark.parametrize("path", sorted((INFRA / "iam").glob("*.json")), ids=lambda p: p.name)
def test_no_policy_grants_wildcard_actions(path: Path) -> None:
    for statement in _statements(path):
        for action in _as_list(statement["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{path.name}: {action}"
        if "iam:PassRole" in _as_list(statement["Action"]):
            assert "*" not in _as_list(statement["Resource"]), "PassRole on any role"


def test_bucket_policy_is_least_privilege() -> None:
    statements = _statements(BUCKET_POLICY)
    actions: dict[str, list[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        resources = _as_list(statement["Resource"])
        assert "*" not in resources and all(r.startswith("arn:aws:s3:::") for r in resources)
        for action in _as_list(statement["Action"]):
            actions.setdefault(action, []).extend(resources)
    bucket_arn = actions["s3:ListBucket"][0]
    assert "/" not in bucket_arn.removeprefix("arn:aws:s3:::")
    listing = next(s for s in statements if "s3:ListBucket" in _as_list(s["Action"]))
    prefixes = listing["Condition"]["StringLike"]["s3:prefix"]
    assert prefixes and all(p and not p.startswith("*") for p in prefixes)
    for needed in (
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    ):
        for resource in actions[needed]:
            # Objects under one prefix of the bucket, never the whole bucket.
            assert resource.startswith(bucket_arn + "/") and resource.endswith("/*"), resource
            assert resource != bucket_arn + "/*", f"{needed} on the whole bucket"


# --- MLflow server script -------------------------------------------------------------

FAKE_MLFLOW = """#!{python}
# Stands in for `mlflow`: records its arguments, serves /health on --host/--port.
import http.server, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_MLFLOW_ARGS"], "w") as out:
    json.dump({{"args": args, "env": {{k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}}}}, out)
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
    def log_message(self, *a):
        pass
http.server.HTTPServer((host, port), Health).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # UDP connect sends nothing; picks a source address
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.fixture()
def fake_mlflow_env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "mlflow"
    fake.write_text(FAKE_MLFLOW.format(python=sys.executable))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_BIN": str(fake),
        "MLFLOW_SERVER_STATE_DIR": str(tmp_path / "state"),
        "FAKE_MLFLOW_ARGS": str(tmp_path / "args.json"),
    }
    return env


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SERVE), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_serve_script_parses_and_defaults_to_loopback() -> None:
    assert subprocess.run(["bash", "-n", str(SERVE)]).returncode == 0
    assert 'host="${MLFLOW_SERVER_HOST:-127.0.0.1}"' in SERVE.read_text()


def test_serve_refuses_auth_without_an_admin_password(fake_mlflow_env: dict[str, str]) -> None:
    result = _serve(fake_mlflow_env, "start", "--port", str(_free_port()))
    assert result.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr


def test_serve_starts_on_loopback_with_auth_and_stops(
    fake_mlflow_env: dict[str, str], tmp_path: Path
) -> None:
    port = _free_port()
    env = fake_mlflow_env | {"MLFLOW_AUTH_ADMIN_PASSWORD": "never-in-a-file-123"}
    state = Path(env["MLFLOW_SERVER_STATE_DIR"])
    started = _serve(env, "start", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in started.stdout
        recorded = json.loads(Path(env["FAKE_MLFLOW_ARGS"]).read_text())
        args = recorded["args"]
        assert args[args.index("--host") + 1] == "127.0.0.1"
        assert args[args.index("--app-name") + 1] == "basic-auth"
        assert "--serve-artifacts" in args
        assert args[args.index("--backend-store-uri") + 1].startswith("sqlite:///")
        # Auth config rendered into the state dir, without the password; CSRF key private.
        rendered = Path(recorded["env"]["MLFLOW_AUTH_CONFIG_PATH"])
        assert rendered.parent == state
        assert "never-in-a-file" not in rendered.read_text()
        assert stat.S_IMODE((state / "secret_key").stat().st_mode) == 0o600
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        other = _non_loopback_address()
        if other:  # bound to loopback only: another local address is refused
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
        assert "running" in _serve(env, "status").stdout
    finally:
        stopped = _serve(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert _serve(env, "status").returncode == 3
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
