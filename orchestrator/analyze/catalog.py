"""What the analysis reads: metric keys (from the probes' names contract), their direction,
and the order of model sizes in tables."""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.stores.axes import (  # noqa: F401 (the analysis's names)
    AXIS_OBJECTIVE,
    AXIS_REGISTER_DEPTH,
    AXIS_REGISTERS,
    AXIS_SEED,
    AXIS_SIZE,
    AXIS_STEPS,
)
from trainers.config import MODEL_SIZES
from trainers.emergence import keys as emergence_keys
from trainers.probes import names

# Tags written by the sweep driver on every child run (the MLflow layout contract).
ROLE_TAG = "sweep.role"
TRIAL_ROLE = "trial"
ANALYSIS_ROLE = "analysis"
SWEEP_NAME_TAG = "sweep.name"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_ID_TAG = "trial_id"
SPEC_FILE_TAG = "sweep.spec_file"  # on the parent run: the spec file the launch was started from
# A run the sweep's scheduler stopped before its last step (orchestrator/stores/mlflow_runs.py).
STOPPED_AT_STEP_TAG = "stopped_early.step"
STOPPED_REASON_TAG = "stopped_early.reason"
# The class count of the data a trial trained on (chance = 1 / classes), tagged by the trainable.
NUM_CLASSES_TAG = "data.num_classes"
KNOWN_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100}
# The trial's emergence watch, tagged as it trains (trainers/emergence/keys.py).
EMERGENCE_STATUS_TAG = emergence_keys.STATUS
EMERGED_AT_STEP_TAG = emergence_keys.EMERGED_AT_STEP
# Runs from before the objective axis trained supervised classifiers.
DEFAULT_OBJECTIVE = "supervised"
OBJECTIVE_ORDER = ("supervised", "dino", "clip")
# Params that carry the same values, used when a trial lacks an axis tag (e.g. an axis that was not swept).
AXIS_PARAM_FALLBACK = {
    AXIS_SIZE: "model.size",
    AXIS_REGISTERS: "model.num_registers",
    AXIS_STEPS: "steps",
    AXIS_SEED: "seed",
    AXIS_OBJECTIVE: "objective",
    AXIS_REGISTER_DEPTH: "model.register_depth",  # runs from before the key have neither: depth 0
}

OUTLIER_PREFIX = names.outlier_frac("")  # 'probe/outlier_frac/' (the scale-free detector)
OUTPUT_OUTLIER_KEY = names.outlier_frac(names.OUTPUT)
_BLOCK_RE = re.compile(r"^block_(\d+)$")


@dataclass(frozen=True)
class MetricSpec:
    short: str  # name on the command line and in tables
    key: str  # MLflow metric key
    label: str  # axis label in figures and the report
    higher_is_better: bool


REGISTER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("outlier_frac", OUTPUT_OUTLIER_KEY, "outlier fraction (output)", False),
    MetricSpec("top1", names.VAL_TOP1, "val top-1", True),
    MetricSpec("miou", names.SEG_MIOU, "dense mIoU", True),
    MetricSpec("entropy", names.attn("entropy", "cls"), "[CLS] attention entropy", False),
    MetricSpec("tv", names.attn("tv", "cls"), "[CLS] attention total variation (lower = smoother)", False),
    MetricSpec("corloc", names.CORLOC, "CorLoc", True),
)
METRICS_BY_SHORT = {m.short: m for m in REGISTER_METRICS}
# Keys whose whole history the loader reads besides every 'probe/outlier_frac/...' key.
SCALAR_KEYS: tuple[str, ...] = tuple(m.key for m in REGISTER_METRICS if m.key != OUTPUT_OUTLIER_KEY)


def metric_spec(name: str) -> MetricSpec:
    """Look a metric up by short name ('miou') or MLflow key ('probe/seg_miou')."""
    for spec in REGISTER_METRICS:
        if name in (spec.short, spec.key):
            return spec
    known = ", ".join(m.short for m in REGISTER_METRICS)
    raise ValueError(f"unknown metric {name!r}; known: {known} (or their MLflow keys)")


def outlier_location(key: str) -> str | None:
    """'probe/outlier_frac/block_03' -> 'block_03'; None for other keys (including the _abs detector)."""
    if not key.startswith(OUTLIER_PREFIX):
        return None
    return key[len(OUTLIER_PREFIX) :]


def block_index(location: str) -> int | None:
    """'block_03' -> 3; None for 'output'."""
    match = _BLOCK_RE.match(location)
    return int(match.group(1)) if match else None


def size_sort_key(size: str) -> tuple[int, str]:
    """Order sizes as trainers.config.MODEL_SIZES does (micro < ... < giant); unknown labels last."""
    order = list(MODEL_SIZES)
    return (order.index(size), "") if size in order else (len(order), size)


def objective_sort_key(objective: str) -> tuple[int, str]:
    """supervised, dino, clip, then any other name."""
    order = list(OBJECTIVE_ORDER)
    return (order.index(objective), "") if objective in order else (len(order), objective)


def group_label(objective: str, size: str, several_objectives: bool) -> str:
    """Row label of a (objective, size) group in figures: the size alone when one objective was swept."""
    return f"{objective}/{size}" if several_objectives else size


def group_sort_key(label: str) -> tuple[tuple[int, str], tuple[int, str]]:
    objective, _, size = label.rpartition("/")
    return (objective_sort_key(objective or DEFAULT_OBJECTIVE), size_sort_key(size))
