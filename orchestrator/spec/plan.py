"""The plan of a sweep: every trial, its cost and the resources, without starting Ray.

`make_plan` expands a validated SweepSpec into trials (grid x seeds, times num_samples per
cell when there is a search); `format_plan` is what `--dry-run` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.spec.schema import SweepSpec, describe_param
from orchestrator.stores.mlflow_uri import DEFAULT_TRACKING_URI
from trainers.config import DataConfig, ModelConfig, TrainConfig
from trainers.cost import objective_train_flops_per_image

# Classes of the real data sets; the generated 'shapes' set has data.num_classes.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagefolder": 1000, "shards": 1000}
# Searched keys under these prefixes change a trial's cost, so the estimate holds for the base value only.
COST_KEYS = ("steps", "optim.batch_size", "model.", "data.num_classes")


@dataclass
class TrialPlan:
    index: int
    axes: dict[str, Any]  # grid axis values, including 'seed'
    config: TrainConfig
    flops: int  # estimated training FLOPs of the whole trial


@dataclass
class SweepPlan:
    spec: SweepSpec
    trials: list[TrialPlan]
    cpu_per_trial: float
    gpu_per_trial: float
    total_cpu: float  # every trial at once
    total_gpu: float
    total_flops: int
    searched: dict[str, Any] = field(default_factory=dict)  # search space (key -> param), when search

    @property
    def concurrent_trials(self) -> int | None:
        """Trials running at once when max_concurrent caps it; None when the cluster decides."""
        cap = self.spec.max_concurrent
        return None if cap is None else min(cap, len(self.trials))


def num_classes(data: DataConfig) -> int:
    """Classes of the data set: shapes has data.num_classes; imagefolder is ImageNet-1k unless set;
    image-text data trains no classifier."""
    if data.name in ("webdataset", "csv"):
        return 0
    if data.name == "shapes" or (data.name in ("imagefolder", "shards") and "num_classes" in data.model_fields_set):
        return data.num_classes
    return DATASET_CLASSES[data.name]


def describe_data(data: DataConfig) -> str:
    """How a trial reads its data and what a resume gets: one plan line."""
    if data.name == "shapes":
        how = "generated on the device"
    elif data.name == "shards":
        where = "by ranged GETs, no copy on the node" if (data.root or "").startswith("s3://") else "in place"
        decode = {
            "auto": "on the GPU where the trial has one, else in DataLoader workers",
            "gpu": "on the trial's device",
            "cpu": "in DataLoader workers",
        }[data.decode]
        how = f"shards {data.root} read {where}; JPEGs decoded {decode}"
    else:
        copy = "; s3:// synced once to each node's cache" if (data.root or "").startswith("s3://") else ""
        how = f"{data.name} {data.root}{copy}"
    # Every source reads by (seed, step) (trainers/data/base.py): no source streams in file order.
    return f"Data: {how}; resume exact (the batch of step s depends only on seed and s)"


def tokens_per_image(model: ModelConfig) -> int:
    """Sequence length: patches + [CLS] + registers."""
    return model.num_patches + 1 + model.num_registers


def trial_flops(cfg: TrainConfig) -> int:
    return objective_train_flops_per_image(cfg, num_classes(cfg.data)) * cfg.optim.batch_size * cfg.steps


def make_plan(spec: SweepSpec) -> SweepPlan:
    samples = spec.search.num_samples if spec.search is not None else 1
    trials: list[TrialPlan] = []
    for assignment in spec.assignments():
        cfg = spec.trial_config(assignment)
        flops = trial_flops(cfg)
        for _ in range(samples):
            trials.append(TrialPlan(index=len(trials), axes=dict(assignment), config=cfg, flops=flops))
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    return SweepPlan(
        spec=spec,
        trials=trials,
        cpu_per_trial=cpu,
        gpu_per_trial=gpu,
        total_cpu=cpu * len(trials),
        total_gpu=gpu * len(trials),
        total_flops=sum(t.flops for t in trials),
        searched=dict(spec.search.space) if spec.search is not None else {},
    )


def format_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f} FLOP"


def _number(value: float) -> str:
    return f"{value:g}"


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def format_plan(plan: SweepPlan) -> str:
    """The --dry-run text: every trial, the counts, resources, FLOPs and where results go."""
    spec = plan.spec
    axis_keys = list(spec.axes)
    samples = spec.search.num_samples if spec.search is not None else 1
    header = ["#", *axis_keys]
    if plan.searched:
        header += ["sample", *plan.searched]
    if "steps" not in axis_keys:
        header.append("steps")
    header += ["tokens", "train FLOPs"]
    ranges = [describe_param(p) for p in plan.searched.values()]
    rows = []
    for trial in plan.trials:
        row = [str(trial.index), *(_cell(trial.axes[k]) for k in axis_keys)]
        if plan.searched:
            row += [f"{trial.index % samples + 1}/{samples}", *ranges]
        if "steps" not in axis_keys:
            row.append(str(trial.config.steps))
        row += [str(tokens_per_image(trial.config.model)), format_flops(trial.flops)]
        rows.append(row)

    cells = len(plan.trials) // samples
    grid_cells = cells // len(spec.seeds)
    seeds = len(spec.seeds)
    count = f"{len(plan.trials)} trials = {grid_cells} grid cells x {seeds} seed{'s' if seeds > 1 else ''}"
    if spec.search is not None:
        count += f" x {samples} samples"
    lines = [f"Sweep {spec.name!r}: {count}", "", *_table(header, rows), ""]

    if spec.search is not None:
        lines.append(
            f"Search: Optuna TPE, {samples} samples per grid cell, {spec.search.mode}imising {spec.search.metric};"
            f" searched keys: {', '.join(f'{k} {r}' for k, r in zip(plan.searched, ranges))}"
        )
    if spec.scheduler is not None:
        s = spec.scheduler
        lines.append(
            f"Scheduler: ASHA on {s.metric} ({s.mode}), grace period {s.grace_period} steps,"
            f" reduction factor {_number(s.reduction_factor)}"
        )
    cpu, gpu = _number(plan.cpu_per_trial), _number(plan.gpu_per_trial)
    lines.append(
        f"Resources: {cpu} CPU, {gpu} GPU per trial; all {len(plan.trials)} at once:"
        f" {_number(plan.total_cpu)} CPU, {_number(plan.total_gpu)} GPU"
    )
    concurrent = plan.concurrent_trials
    if concurrent is None:
        lines.append("Concurrency: no max_concurrent; as many trials as the cluster's free resources fit")
    else:
        lines.append(
            f"Concurrency: at most {concurrent} trials at once:"
            f" {_number(plan.cpu_per_trial * concurrent)} CPU, {_number(plan.gpu_per_trial * concurrent)} GPU"
        )
    per_trial = sorted({t.flops for t in plan.trials})
    span = format_flops(per_trial[0]) if len(per_trial) == 1 else f"{format_flops(per_trial[0])} to {format_flops(per_trial[-1])}"
    lines.append(f"Training FLOPs (estimate): {span} per trial, {format_flops(plan.total_flops)} for the sweep")
    objectives = sorted({t.config.objective for t in plan.trials} - {"supervised"})
    if objectives:
        passes = {"dino": "dino: teacher on 2 global crops, student on 2 global + local crops, heads",
                  "clip": "clip: image and text towers"}
        lines.append(f"  (extra passes counted: {'; '.join(passes[o] for o in objectives)})")
    if any(k == c or k.startswith(c) for k in plan.searched for c in COST_KEYS):
        lines.append("  (searched keys change the cost; the estimate uses the base train values)")
    lines += sorted({describe_data(t.config.data) for t in plan.trials})
    lines.append(f"Retries: up to {spec.max_failures} per failed trial")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    where = uri if uri else f"{DEFAULT_TRACKING_URI} (MLFLOW_TRACKING_URI not set; file in the current directory)"
    lines.append(f"Results: MLflow experiment {spec.experiment_name!r} at {where}")
    lines.append(f"         Tune storage {spec.storage_path}")
    return "\n".join(lines)
