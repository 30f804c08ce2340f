"""What a cluster can hold: its node types and how many trials fit on them.

A `ClusterShape` is the list of node types an autoscaler may start (each with the resources
of one node and how many of it), or the nodes of a fixed cluster. It comes from a Ray cluster
launcher YAML or a KubeRay RayCluster manifest (`load_cluster_file`, for `--dry-run --cluster`),
or from the running cluster at launch (orchestrator/launch/autoscaling.py). The arithmetic here
is the same for both:

- `worker_bundle`: what one process of a trial asks for (the whole trial for a one-process
  trial, one rank for a multi-worker trial): also the bundle that is asked of the autoscaler.
- `check_cluster_holds`: a trial that no node type can ever hold is refused before launch,
  with one line that names the node types (SpecError, exit 2 like any bad spec).
- `trials_at_full_size` / `trials_that_fit`: trials at once on the cluster at its largest, or
  on the nodes that are up now. A multi-worker trial's ranks may sit on different nodes
  (Ray Train's placement group packs them, softly), so a trial needs `workers` free worker
  slots anywhere; a slot is one worker's bundle on one node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from orchestrator.spec.errors import SpecError
from orchestrator.spec.schema import Resources

# Resource keys a trial asks for, in the order messages show them.
SHOWN_KEYS = ("CPU", "GPU")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # one node's resources; empty when the config leaves them to detection
    max_nodes: int  # how many the autoscaler may run at once (1 for the head; the count for a fixed cluster)


@dataclass(frozen=True)
class ClusterShape:
    node_types: tuple[NodeType, ...]
    source: str  # where the node types were read, for every message that uses them
    autoscaling: bool  # False: a fixed cluster, its nodes now are all it will have
    max_workers: int | None = None  # the autoscaler's bound on worker nodes of all types (head not counted)
    head: str | None = None  # the head's node type (one node, outside max_workers)
    notes: tuple[str, ...] = field(default=())  # what was assumed while reading

    def with_note(self, note: str) -> "ClusterShape":
        return ClusterShape(self.node_types, self.source, self.autoscaling, self.max_workers, self.head, (*self.notes, note))


def worker_bundle(resources: Resources) -> dict[str, float]:
    """One process of a trial: the whole trial for a one-process trial, one rank otherwise."""
    cpu, gpu = (resources.cpu_per_worker, resources.gpu_per_worker) if resources.distributed else (resources.cpu, resources.gpu)
    return {key: value for key, value in (("CPU", cpu), ("GPU", gpu)) if value > 0}


def workers_on(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of `bundle` one node holds."""
    fits = [math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in bundle.items() if need > 0]
    return min(fits) if fits else 0


def full_size_slots(shape: ClusterShape, bundle: Mapping[str, float]) -> int:
    """Worker slots with every node type at its max. The autoscaler's global max_workers caps
    the worker nodes of all types together: counted for the types that hold the most first."""
    slots, nodes_left = 0, shape.max_workers
    per_type = sorted(
        ((workers_on(t.resources, bundle), t) for t in shape.node_types if t.resources), key=lambda pair: -pair[0]
    )
    for per_node, node_type in per_type:
        count = node_type.max_nodes
        if node_type.name != shape.head and nodes_left is not None:
            count = min(count, nodes_left)
            nodes_left -= count
        slots += per_node * count
    return slots


def trials_at_full_size(shape: ClusterShape, resources: Resources, max_concurrent: int | None, trials: int) -> int:
    """Trials at once on the cluster at its largest, never above max_concurrent or the trials there are."""
    fit = full_size_slots(shape, worker_bundle(resources)) // resources.workers
    return min(fit, trials, max_concurrent or trials)


def at_once_line(shape: ClusterShape, resources: Resources, max_concurrent: int | None, trials: int) -> list[str]:
    """The plan's (and the launch's) words for it: trials at once on the cluster, and the notes."""
    at_once = trials_at_full_size(shape, resources, max_concurrent, trials)
    size = "at full size" if shape.autoscaling else "as it is (no autoscaler)"
    count = f"{at_once} trial{'s' if at_once != 1 else ''}"
    if at_once == 0 and any(not t.resources for t in shape.node_types):
        count = "an unknown number of trials"
    return [f"on the cluster {size}: {count} at once ({shape.source}: {describe_node_types(shape)})"] + [
        f"  (note: {note})" for note in shape.notes
    ]


def trials_that_fit(nodes: Iterable[Mapping[str, float]], resources: Resources) -> int:
    """Trials whose processes the given nodes (their total resources) hold at once."""
    bundle = worker_bundle(resources)
    return sum(workers_on(node, bundle) for node in nodes) // resources.workers


def format_resources(resources: Mapping[str, float]) -> str:
    keys = [k for k in SHOWN_KEYS if k in resources] + sorted(
        k for k in resources if k not in SHOWN_KEYS and k not in ("memory", "object_store_memory") and not k.startswith("node:")
    )
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}" if keys else "{resources not given}"


def describe_node_types(shape: ClusterShape) -> str:
    """`head.cpu {CPU: 0}, gpu.a10g.spot {CPU: 8, GPU: 1} x8, ...`"""
    parts = []
    for t in shape.node_types:
        count = "" if t.name == shape.head or not shape.autoscaling and t.max_nodes == 1 else f" x{t.max_nodes}"
        parts.append(f"{t.name} {format_resources(t.resources)}{count}")
    return ", ".join(parts)


def check_cluster_holds(shape: ClusterShape, resources: Resources) -> None:
    """Refuse a trial that no node type can ever hold (SpecError on `resources`, one line naming
    the node types); a trial whose workers all together exceed the cluster at its largest too."""
    bundle = worker_bundle(resources)
    what = "one trial" if not resources.distributed else f"one of the trial's {resources.workers} workers"
    kind = "node types" if shape.autoscaling else "nodes"
    known = [t for t in shape.node_types if t.resources]
    if not any(workers_on(t.resources, bundle) for t in known):
        if len(known) < len(shape.node_types):
            return  # types whose resources are detected at launch may hold it (the notes say so)
        raise SpecError(
            "resources",
            f"{what} needs {format_resources(bundle)}, but no node of the cluster can ever hold it;"
            f" its {kind} ({shape.source}): {describe_node_types(shape)}",
        )
    slots = full_size_slots(shape, bundle)
    if resources.distributed and slots < resources.workers and len(known) == len(shape.node_types):
        size = "at its largest" if shape.autoscaling else "now"
        raise SpecError(
            "resources.workers",
            f"one trial needs {resources.workers} workers of {format_resources(bundle)}, but the cluster {size}"
            f" holds {slots}; its {kind} ({shape.source}): {describe_node_types(shape)}",
        )


def shape_from_cluster_config(config: Mapping[str, Any], source: str) -> ClusterShape:
    """A Ray cluster launcher config (also the autoscaling config a head's monitor runs with)."""
    head = config.get("head_node_type")
    global_max = config.get("max_workers")
    types, notes = [], []
    for name, node in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
        if name == head:
            count = 1
        else:
            # Ray's default for a type without max_workers is the cluster's max_workers.
            count = int(node.get("max_workers", global_max if global_max is not None else 0))
        if not resources and name != head:
            notes.append(f"{name} gives no resources (the autoscaler detects them from its instance type): not counted")
        types.append(NodeType(name, resources, count))
    if not types:
        raise SpecError("cluster", f"{source} has no available_node_types")
    return ClusterShape(tuple(types), source, True, None if global_max is None else int(global_max), head, tuple(notes))


def shape_from_raycluster(manifest: Mapping[str, Any], source: str) -> ClusterShape:
    """A KubeRay RayCluster, turned into an autoscaling config by the same code Ray's
    autoscaler runs on KubeRay (worker groups -> node types, container limits -> resources)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = dict(manifest)
    cr["metadata"] = {"namespace": "default", **dict(manifest.get("metadata") or {})}
    return shape_from_cluster_config(_derive_autoscaling_config_from_ray_cr(cr), source)


def load_cluster_file(path: str | Path) -> ClusterShape:
    """`--cluster FILE`: a Ray cluster launcher YAML (infra/aws/cluster.yaml) or a KubeRay
    RayCluster manifest (infra/kuberay/raycluster.yaml)."""
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as error:
        raise SpecError("--cluster", f"cannot read {path}: {error}") from None
    for document in documents:
        if document.get("kind") == "RayCluster":
            return shape_from_raycluster(document, str(path))
        if "available_node_types" in document:
            return shape_from_cluster_config(document, str(path))
    raise SpecError("--cluster", f"{path} is neither a Ray cluster config (available_node_types) nor a KubeRay RayCluster")
