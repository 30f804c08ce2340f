"""Names of what the emergence watch reports, logs and tags: the contract with the orchestrator.

Three channels, each read by a different consumer:

* metrics (logged against the step, MLflow histories): the monitor's stream, one point per
  probe, regular and adaptive alike;
* report values (the numbers a checkpoint's report carries to Tune, `trial.last_result`): what
  the driver's console and checkpoint pruner need without reading MLflow;
* tags (strings on the trial's MLflow run): the event itself, for the UI, its saved view and
  the analysis.
"""

from __future__ import annotations

PREFIX = "emergence"

# Metrics, one point per probe (regular or adaptive), at the probe's step.
OUTLIER_FRAC = f"{PREFIX}/outlier_frac"  # scale-free detector, output patch tokens (= probe/outlier_frac/output)
MAX_OVER_MEDIAN = f"{PREFIX}/max_over_median"  # output patch norms (= probe/norm_max_over_median/patch/output)

# Report values (floats) in every checkpoint report of a monitored trial.
LAST_PROBE_STEP = f"{PREFIX}/last_probe_step"
LAST_CLEAN_STEP = f"{PREFIX}/last_clean_step"  # -1 before the first clean probe
SUSPECTED = f"{PREFIX}/suspected"  # 1 while flagged probes wait for confirmation
EMERGED_AT_STEP_VALUE = f"{PREFIX}/emerged_at_step"  # present once emerged
EMERGED_AT_FRACTION_VALUE = f"{PREFIX}/emerged_at_fraction"
ALERT_VALUE = f"{PREFIX}/alert"  # 1 once emerged with probe.on_emergence: alert
STOPPED_VALUE = f"{PREFIX}/stopped"  # 1 when the trial stopped on emergence (probe.on_emergence: stop)

# Tags on the trial's run.
EMERGED_AT_STEP = "emerged_at_step"
EMERGED_AT_FRACTION = "emerged_at_fraction"
STATUS = "emergence.status"  # emerged | none | unconfirmed (flagged at the end, fewer than K probes)
ALERT = "emergence.alert"  # "true": filter with tags.`emergence.alert` = 'true'
CHECKPOINT_BEFORE = "emergence.checkpoint_before_step"  # the kept checkpoint nearest before the event
CHECKPOINT_AFTER = "emergence.checkpoint_after_step"  # ... and nearest at or after it
# A trial that ended before its configured length, and why. The same pair a scheduler's early
# stop carries, so the analysis leaves every such trial out of its full-length tables alike.
# (orchestrator/stores/mlflow_runs.py writes the scheduler's; the analysis reads both alike.)
STOPPED_AT_STEP = "stopped_early.step"
STOP_REASON = "stopped_early.reason"

STATUS_EMERGED = "emerged"
STATUS_NONE = "none"
STATUS_UNCONFIRMED = "unconfirmed"

# One tag per checkpoint kept past pruning (orchestrator/trials/checkpoint_pruner.py), its URI;
# `python -m orchestrator.inspect run:RUN_ID@STEP` reads it.
KEPT_CHECKPOINT_PREFIX = "checkpoint_uri.step_"


def kept_checkpoint_tag(step: int) -> str:
    return f"{KEPT_CHECKPOINT_PREFIX}{step:07d}"


def kept_checkpoint_step(tag: str) -> int | None:
    """The step a kept-checkpoint tag names, or None for any other tag."""
    if not tag.startswith(KEPT_CHECKPOINT_PREFIX):
        return None
    digits = tag[len(KEPT_CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isdigit() else None
