"""The running cluster's node types, read when the sweep joins it, and the refusal of a trial none can hold.

`running_cluster_shape` reads, right after Ray starts and before anything is written, the
node types the cluster can ever have (orchestrator/spec/cluster.py does the arithmetic):

1. the cluster config in Ray's GCS (`ray._private.state.state.get_cluster_config()`, what Ray
   Train V2 itself checks worker groups against), where the platform reports one;
2. else the autoscaling config of this cluster's monitor: `ray start --head
   --autoscaling-config=FILE` (the cluster launcher's ~/ray_bootstrap_config.yaml, the fake
   multi-node provider's config in the tests). `ray job submit` runs the driver on the head,
   where that monitor process is; it is matched to this cluster by its --gcs-address;
3. else, when that monitor runs without an autoscaling config, or Ray was started in-process
   by this sweep (no RAY_ADDRESS): a fixed cluster, whose nodes now are all it will have;
4. else (a driver off the head; KubeRay's autoscaler, which runs in a container of its own
   and builds its config from the RayCluster object): nothing can be read, and the sweep
   says what it assumes (`None`; see `UNREAD_NOTE`).

What the sweep then asks of the autoscaler is orchestrator/launch/autoscaler_request.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from orchestrator.spec.cluster import (
    ClusterShape,
    NodeType,
    at_once_line,
    check_cluster_holds,
    shape_from_cluster_config,
)
from orchestrator.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

UNREAD_NOTE = (
    "the autoscaler's node types could not be read here (no cluster config in Ray's GCS, and no autoscaler"
    " monitor for this cluster on this machine, as on KubeRay); assumed that some node type holds a worker:"
    " a trial no node can hold waits instead of being refused"
)


def monitor_command_lines(proc: Path = Path("/proc")) -> list[list[str]]:
    """The argv of every Ray autoscaler monitor on this machine (v1 and v2 both run monitor.py)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.endswith(os.path.join("autoscaler", "_private", "monitor.py")) or arg.endswith(
            os.path.join("autoscaler", "v2", "monitor.py")) for arg in argv):
            found.append([a for a in argv if a])
    return found


def option(argv: Sequence[str], name: str) -> str | None:
    prefix = f"--{name}="
    return next((arg[len(prefix):] for arg in argv if arg.startswith(prefix)), None)


def monitor_config(gcs_address: str, command_lines: Sequence[Sequence[str]]) -> tuple[bool, str | None]:
    """(a monitor of this cluster runs here, the autoscaling config file it was started with)."""
    for argv in command_lines:
        if option(argv, "gcs-address") == gcs_address:
            path = option(argv, "autoscaling-config")
            return True, os.path.expanduser(path) if path else None
    return False, None


def read_config_file(path: str) -> Mapping[str, Any]:
    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)


def present_nodes_shape(nodes: Sequence[Mapping[str, Any]], source: str) -> ClusterShape:
    """A fixed cluster: one node type per distinct shape of the nodes alive now."""
    counts: dict[tuple[tuple[str, float], ...], int] = {}
    for node in nodes:
        # Memory differs from node to node by a few bytes; trials ask for CPUs, GPUs and custom resources.
        asked_for = {k: float(v) for k, v in node.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        shape = tuple(sorted(asked_for.items()))
        counts[shape] = counts.get(shape, 0) + 1
    types = tuple(NodeType(f"node{i + 1}" if len(counts) > 1 else "node", dict(shape), n) for i, (shape, n) in enumerate(counts.items()))
    return ClusterShape(types, source, autoscaling=False)


def gcs_cluster_config_shape() -> ClusterShape | None:
    """The cluster config in Ray's GCS, when the platform reported one."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    types = tuple(
        NodeType(group.name, {k: float(v) for k, v in group.resources.items()}, group.max_count if group.max_count >= 0 else 10**6)
        for group in config.node_group_configs
    )
    return ClusterShape(types, "the cluster config in Ray's GCS", autoscaling=True)


def alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def running_cluster_shape(in_process: bool) -> ClusterShape | None:
    """The node types of the cluster this driver runs on (None: they could not be read)."""
    import ray

    if in_process:
        return present_nodes_shape(alive_node_resources(), "this machine (Ray started in-process)")
    try:
        from_gcs = gcs_cluster_config_shape()
    except Exception as error:  # an older GCS, a refused call: go on to the other sources
        logger.debug("no cluster config from the GCS: %s", error)
        from_gcs = None
    if from_gcs is not None:
        return from_gcs
    gcs_address = ray.get_runtime_context().gcs_address
    found, path = monitor_config(gcs_address, monitor_command_lines())
    if path:
        try:
            return shape_from_cluster_config(read_config_file(path), f"the autoscaler's config {path}")
        except (OSError, ValueError, yaml.YAMLError) as error:
            logger.warning("cannot read the autoscaler's config %s: %s", path, error)
            return None
    if found:
        return present_nodes_shape(alive_node_resources(), f"the cluster at {gcs_address}, whose monitor runs without an autoscaling config")
    return None


def cluster_for_launch(spec: SweepSpec, trials: int, in_process: bool) -> ClusterShape | None:
    """Read the running cluster's node types, refuse a trial none can hold (SpecError), and say
    what a joined cluster holds at full size (or what was assumed). None: not readable."""
    shape = running_cluster_shape(in_process)
    if shape is None:
        print(f"note: {UNREAD_NOTE}", file=sys.stderr)
        return None
    check_cluster_holds(shape, spec.resources)
    if not in_process:
        first, *notes = at_once_line(shape, spec.resources, spec.max_concurrent, trials)
        print("\n".join([f"Concurrency {first}", *notes]))
    return shape
