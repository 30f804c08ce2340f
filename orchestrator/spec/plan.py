"""The plan of a sweep: every trial, its cost and the resources, without starting Ray.

`make_plan` expands a validated SweepSpec into trials (grid x seeds, times num_samples per
cell when there is a search); `format_plan` is what `--dry-run` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.spec.cluster import ClusterShape, at_once_line
from orchestrator.spec.errors import SpecError
from orchestrator.spec.memory import TrialMemory, format_gb, memory_lines, trial_memory
from orchestrator.spec.schema import SweepSpec, describe_param
from orchestrator.stores.mlflow_uri import DEFAULT_TRACKING_URI
from trainers.config import DataConfig, ModelConfig, TrainConfig, data_parallel_problem
from trainers.cost import gpu_seconds, objective_train_flops_per_image

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
    gpu_hours: float = 0.0  # on spec.cost.gpu_type (trainers/cost.py): measured images/s, else FLOPs at an MFU
    usd: float = 0.0  # gpu_hours * spec.cost's price
    estimate: str = ""  # how gpu_hours was estimated
    gpus: float = 0.0  # GPUs the trial holds (all its workers together)
    memory: TrialMemory | None = None  # per process (per worker) on spec.cost.gpu_type

    @property
    def wall_hours(self) -> float | None:
        """Wall-clock hours on its GPUs: GPU-hours / GPUs (a shared GPU's fraction stretches it); None without a GPU."""
        return self.gpu_hours / self.gpus if self.gpus > 0 else None


@dataclass
class SweepPlan:
    spec: SweepSpec
    trials: list[TrialPlan]
    cpu_per_trial: float  # every worker of the trial together
    gpu_per_trial: float
    total_cpu: float  # every trial at once
    total_gpu: float
    total_flops: int
    total_gpu_hours: float = 0.0
    total_usd: float = 0.0
    searched: dict[str, Any] = field(default_factory=dict)  # search space (key -> param), when search

    @property
    def concurrent_trials(self) -> int | None:
        """Trials running at once when max_concurrent caps it; None when the cluster decides."""
        cap = self.spec.max_concurrent
        return None if cap is None else min(cap, len(self.trials))

    @property
    def workers(self) -> int:
        return self.spec.resources.workers


def check_workers(spec: SweepSpec, cfg: TrainConfig) -> None:
    """What a multi-worker trial needs of its config (trainers/loop.py checks it again)."""
    problem = data_parallel_problem(cfg, spec.resources.workers)
    if problem:
        raise SpecError("resources.workers", problem)


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
        check_workers(spec, cfg)
        flops = trial_flops(cfg)
        seconds, estimate = gpu_seconds(cfg, flops, spec.cost.gpu_type, spec.cost.mfu, spec.cost.peak)
        hours = seconds / 3600
        memory = trial_memory(cfg, num_classes(cfg.data), spec.resources, spec.cost.memory_gb)
        for _ in range(samples):
            trials.append(
                TrialPlan(
                    index=len(trials), axes=dict(assignment), config=cfg, flops=flops,
                    gpu_hours=hours, usd=hours * spec.cost.price, estimate=estimate,
                    gpus=spec.resources.gpu_per_trial, memory=memory,
                )
            )
    cpu, gpu = spec.resources.cpu_per_trial, spec.resources.gpu_per_trial
    return SweepPlan(
        spec=spec,
        trials=trials,
        cpu_per_trial=cpu,
        gpu_per_trial=gpu,
        total_cpu=cpu * len(trials),
        total_gpu=gpu * len(trials),
        total_flops=sum(t.flops for t in trials),
        total_gpu_hours=sum(t.gpu_hours for t in trials),
        total_usd=sum(t.usd for t in trials),
        searched=dict(spec.search.space) if spec.search is not None else {},
    )


def format_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f} FLOP"


def format_hours(hours: float) -> str:
    if hours < 0.01:
        return "<0.01" if hours > 0 else "0"
    return f"{hours:.3g}" if hours < 100 else f"{hours:,.0f}"


def format_usd(usd: float) -> str:
    if usd < 0.01:
        return "<$0.01" if usd > 0 else "$0"
    return f"${usd:,.2f}" if usd < 100 else f"${usd:,.0f}"


def cost_lines(plan: SweepPlan) -> list[str]:
    """GPU-hours and money per trial and for the sweep, on the spec's cost.gpu_type."""
    cost, trials = plan.spec.cost, plan.trials
    low, high = format_hours(min(t.gpu_hours for t in trials)), format_hours(max(t.gpu_hours for t in trials))
    span = low if low == high else f"{low} to {high}"
    bases = sorted({t.estimate for t in trials})
    lines = [
        f"GPU time and cost (estimate on {cost.gpu_type}, {'; '.join(bases)}; ${cost.price:g} per GPU-hour):"
        f" {span} GPU-hours per trial; {format_hours(plan.total_gpu_hours)} GPU-hours,"
        f" {format_usd(plan.total_usd)} for the sweep"
    ]
    gpus = plan.gpu_per_trial
    if gpus == 0:
        lines.append(f"  (the trials ask for no GPU: these figures are what they would take on {cost.gpu_type})")
    else:
        wall = sorted(t.wall_hours or 0.0 for t in trials)
        span = format_hours(wall[0]) if format_hours(wall[0]) == format_hours(wall[-1]) else f"{format_hours(wall[0])} to {format_hours(wall[-1])}"
        share = f"its {_number(gpus)} GPU{'s' if gpus > 1 else ''}" if gpus >= 1 else f"its {_number(gpus)} of a GPU (shared, so slower)"
        lines.append(f"  (a trial on {share}: {span} hours wall clock = GPU-hours / GPUs per trial)")
    lines.append("  (set cost: {gpu_type, usd_per_gpu_hour, mfu, peak_tflops} in the spec, or --set cost.gpu_type=A100)")
    return lines


def lr_lines(plan: SweepPlan) -> list[str]:
    """The peak learning rate of each distinct optimizer setting, with its linear batch scaling."""
    lines: list[str] = []
    settings = {(o.name, o.lr, o.lr_ref_batch, o.batch_size): o for o in (t.config.optim for t in plan.trials)}
    for _, o in sorted(settings.items(), key=lambda item: (item[0][1], item[0][3], item[0][0])):
        if o.lr_ref_batch is None:
            lines.append(f"Learning rate: {o.lr:g} ({o.name}) at global batch {o.batch_size}, as given")
        else:
            lines.append(
                f"Learning rate: {o.lr:g} given at reference batch {o.lr_ref_batch}, scaled linearly to global batch"
                f" {o.batch_size}: {o.lr:g} * {o.batch_size} / {o.lr_ref_batch} = {o.scaled_lr:.4g} ({o.name})"
            )
    return lines


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


def concurrency_lines(plan: SweepPlan, cluster: ClusterShape | None) -> list[str]:
    """How many trials run at once: max_concurrent, and on the cluster at full size when its node
    types are known (`--cluster FILE`, or read from the running cluster at launch)."""
    concurrent = plan.concurrent_trials
    if concurrent is None:
        lines = ["Concurrency: no max_concurrent; as many trials as the cluster holds"]
    else:
        lines = [
            f"Concurrency: at most {concurrent} trials at once:"
            f" {_number(plan.cpu_per_trial * concurrent)} CPU, {_number(plan.gpu_per_trial * concurrent)} GPU"
        ]
    if cluster is None:
        if not plan.gpu_per_trial:
            return lines  # CPU trials: no GPU nodes to scale out for
        lines.append(
            "  (on an autoscaling cluster the limit follows the nodes that are up, and the sweep asks the"
            " autoscaler for its trials' GPUs; --cluster CONFIG shows the figure at full size)"
        )
        return lines
    spec = plan.spec
    return lines + [f"  {line}" for line in at_once_line(cluster, spec.resources, spec.max_concurrent, len(plan.trials))]


def _memory_cell(memory: TrialMemory | None) -> str:
    if memory is None:
        return "-"
    return format_gb(memory.estimate.total) + ("" if memory.fits else " !")


def plan_memory_lines(plan: SweepPlan) -> list[str]:
    """Memory per GPU of every trial, and a warning naming each trial that will not fit, with its fix."""
    spec = plan.spec
    trials = [(t.index, {k: _cell(v) for k, v in t.axes.items()}, t.memory) for t in plan.trials if t.memory is not None]
    if not trials:
        return []
    return memory_lines(trials, spec.resources, spec.cost.gpu_type, spec.cost.memory_gb, spec.train.optim.batch_size)


def format_plan(plan: SweepPlan, cluster: ClusterShape | None = None) -> str:
    """The --dry-run text: every trial, the counts, resources, FLOPs and where results go;
    with `cluster`, how many trials the cluster holds at once."""
    spec = plan.spec
    axis_keys = list(spec.axes)
    samples = spec.search.num_samples if spec.search is not None else 1
    header = ["#", *axis_keys]
    if plan.searched:
        header += ["sample", *plan.searched]
    if "steps" not in axis_keys:
        header.append("steps")
    header += ["tokens", "train FLOPs", "GPU-h", "USD", "GPUs", "wall-h", "mem GB"]
    ranges = [describe_param(p) for p in plan.searched.values()]
    rows = []
    for trial in plan.trials:
        row = [str(trial.index), *(_cell(trial.axes[k]) for k in axis_keys)]
        if plan.searched:
            row += [f"{trial.index % samples + 1}/{samples}", *ranges]
        if "steps" not in axis_keys:
            row.append(str(trial.config.steps))
        row += [str(tokens_per_image(trial.config.model)), format_flops(trial.flops)]
        row += [format_hours(trial.gpu_hours), format_usd(trial.usd), _number(trial.gpus)]
        row.append("-" if trial.wall_hours is None else format_hours(trial.wall_hours))
        row.append(_memory_cell(trial.memory))
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
    r = spec.resources
    if r.distributed:
        batches = sorted({t.config.optim.batch_size for t in plan.trials})
        batch = "/".join(str(b) for b in batches)
        shares = "/".join(str(b // r.workers) for b in batches)
        lines.append(
            f"Workers: {r.workers} data-parallel workers per trial (Ray Train, DDP over"
            f" {'NCCL' if r.gpu_per_worker else 'gloo'}), each {_number(r.cpu_per_worker)} CPU,"
            f" {_number(r.gpu_per_worker)} GPU; global batch {batch} = {r.workers} x {shares} per worker;"
            f" {_number(r.gpu_per_trial)} GPUs per trial"
        )
    lines += concurrency_lines(plan, cluster)
    per_trial = sorted({t.flops for t in plan.trials})
    span = format_flops(per_trial[0]) if len(per_trial) == 1 else f"{format_flops(per_trial[0])} to {format_flops(per_trial[-1])}"
    lines.append(f"Training FLOPs (estimate): {span} per trial, {format_flops(plan.total_flops)} for the sweep")
    objectives = sorted({t.config.objective for t in plan.trials} - {"supervised"})
    if objectives:
        passes = {"dino": "dino: teacher on 2 global crops, student on 2 global + local crops, heads",
                  "clip": "clip: image and text towers"}
        lines.append(f"  (extra passes counted: {'; '.join(passes[o] for o in objectives)})")
    lines += cost_lines(plan)
    lines += plan_memory_lines(plan)
    lines += lr_lines(plan)
    if any(k == c or k.startswith(c) for k in plan.searched for c in COST_KEYS):
        lines.append("  (searched keys change the cost; the estimate uses the base train values)")
    lines += sorted({describe_data(t.config.data) for t in plan.trials})
    lines.append(f"Retries: up to {spec.max_failures} per failed trial")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    where = uri if uri else f"{DEFAULT_TRACKING_URI} (MLFLOW_TRACKING_URI not set; file in the current directory)"
    lines.append(f"Results: MLflow experiment {spec.experiment_name!r} at {where}")
    lines.append(f"         Tune storage {spec.storage_path}")
    return "\n".join(lines)
