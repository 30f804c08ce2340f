"""Which metrics a search or scheduler may name: those in every report a trial makes to Tune.

Tune checks that every report holds the search's and the scheduler's metric and stops the
whole sweep when one does not (`TuneController._validate_result_metrics` in Ray 2.60). A
trial reports at every checkpoint point (orchestrator/trials/reporting.py), with the latest
value of each scalar it measured; a metric the sweep's search or scheduler needs that was
not measured yet at a report is measured there. So a metric is safe when it is measured
for sure, whatever the weights:

- `train/loss`, when a log point comes no later than the first report;
- the objective's evaluation metrics (val/top1 for every objective; val/loss for the
  supervised one; val/knn_top1 for DINO, unless its data has no labelled training images;
  val/zeroshot_top1 for CLIP);
- the probe scalars that every probe measures for the trial's depth and register count.
  Probe metrics that exist only when the model has outlier tokens, or the data has masks
  (probe/linear/.../outlier, probe/neighbour_cos/outlier, probe/seg_miou, probe/corloc), may be
  missing from a report and are refused.

No torch here: the spec is checked before Ray starts. tests/test_metric_reports.py checks
these lists against what the objectives and probes actually measure.
"""

from __future__ import annotations

from trainers.config import TrainConfig
from trainers.data import IMAGE_TEXT
from trainers.probes import names

# trainers/objectives/{supervised,dino,clip}.py: what each objective's evaluation returns.
VAL_KNN_TOP1 = "val/knn_top1"
VAL_ZEROSHOT_TOP1 = "val/zeroshot_top1"
EVALUATION_METRICS: dict[str, tuple[str, ...]] = {
    "supervised": (names.VAL_LOSS, names.VAL_TOP1),
    "dino": (names.VAL_TOP1, VAL_KNN_TOP1),
    "clip": (names.VAL_TOP1, VAL_ZEROSHOT_TOP1),
}
# trainers/probes/norms.py (STAT_NAMES, COMPACT_PATCH_STATS) and linear.py (MIN_IMAGES).
NORM_STATS = ("mean", "median", "p99", "max", "max_over_median")
BLOCK_PATCH_STATS = ("median", "max_over_median")
LINEAR_PROBE_MIN_IMAGES = 4

EXAMPLES = f"{names.VAL_TOP1}, {names.VAL_LOSS}, {names.TRAIN_LOSS} or {names.outlier_frac(names.OUTPUT)}"


def first_report_step(cfg: TrainConfig) -> int:
    """The step of a fresh trial's first report: its first evaluation or checkpoint, or its end."""
    return min(every for every in (cfg.eval_every, cfg.checkpoint_every, cfg.steps) if every > 0)


def evaluation_metrics(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.objective == "dino" and cfg.data.name in IMAGE_TEXT:
        return ()  # no labelled training images, so no k-NN bank (trainers/objectives/dino.py)
    return EVALUATION_METRICS[cfg.objective]


def probe_metrics(cfg: TrainConfig) -> set[str]:
    """The probe scalars of every probe of this trial, whatever its weights (trainers/probes/report.py)."""
    _, depth, _ = cfg.model.dims
    registers = cfg.model.num_registers
    # Registers that enter at a later block (model.register_depth, where the model has it) have
    # per-block statistics only from that block on.
    enter = getattr(cfg.model, "register_depth", 0) or 0
    blocks = [names.block(i) for i in range(depth)]
    found = {names.PROBE_SECONDS, names.NEIGHBOUR_COS_NORMAL}
    for location in (*blocks, names.OUTPUT):
        found.update(names.outlier_frac(location, detector) for detector in names.DETECTORS)
    for index, block in enumerate(blocks):
        found.update(names.norm_stat(stat, "patch", block) for stat in BLOCK_PATCH_STATS)
        found.add(names.norm_stat("mean", "cls", block))
        if registers and index >= enter:
            found.add(names.norm_stat("mean", "reg", block))
    tokens = ["patch", "cls"] + (["reg", *(f"reg_{r:02d}" for r in range(registers))] if registers else [])
    found.update(names.norm_stat(stat, token, names.OUTPUT) for stat in NORM_STATS for token in tokens)
    queries = ["cls", *(f"reg_{r:02d}" for r in range(registers))]
    found.update(names.attn(stat, query) for stat in ("entropy", "tv") for query in queries)
    found.add(names.attn("outlier_mass", "cls"))
    if cfg.probe.batch_size >= LINEAR_PROBE_MIN_IMAGES:
        # Normal tokens always exist: the robust detector flags fewer than half of them.
        found.update(names.linear_probe(task, "normal") for task in ("position_acc", "pixel_mse", "class_acc"))
        found.add(names.linear_probe("class_acc", "cls"))
        if registers:
            found.add(names.linear_probe("class_acc", "reg"))
    return found


def metric_problem(cfg: TrainConfig, metric: str) -> str | None:
    """Why `metric` can be missing from a report of a trial with this config, or None."""
    first = first_report_step(cfg)
    if metric == names.TRAIN_LOSS:
        if cfg.log_every > first:
            return (
                f"is first logged at step {cfg.log_every} (train.log_every), after the trial's first report"
                f" at step {first}; set train.log_every to at most {first}"
            )
        return None
    if metric.startswith("val/"):
        offered = evaluation_metrics(cfg)
        if metric in offered:
            return None
        if not offered:
            return f"is never measured: a {cfg.objective} trial on {cfg.data.name} data has no evaluation"
        return f"is not measured by the {cfg.objective} objective's evaluation; it reports {', '.join(offered)}"
    if metric.startswith(f"{names.PREFIX}/"):
        if cfg.probe.every == 0 and not cfg.probe.at_end:
            return "is never measured: the probes are off (train.probe.every 0 and at_end false)"
        if metric in probe_metrics(cfg):
            return None
        return (
            f"is not measured at every probe of a {cfg.model.label} ViT with {cfg.model.num_registers} registers"
            f" (metrics of outlier tokens and masks exist only when there are some); use e.g. {EXAMPLES}"
        )
    return f"is not a metric the trials report; use e.g. {EXAMPLES}"
