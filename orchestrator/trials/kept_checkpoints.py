"""Which of a trial's checkpoints outlive pruning, and why: pure logic for the checkpoint pruner.

Beyond the newest few (a resume needs them), three kinds are kept:

* **milestones**: the checkpoints at the fractions of training `probe.keep_checkpoints_at` lists
  (the trainer writes one at each of those steps);
* **the event's neighbours**: once artifacts have emerged at step E, the checkpoint nearest
  before E (the last model without them) and the one nearest at or after E;
* **the open window**, until the event is known: the onset of artifacts that a later probe
  confirms lies after the last clean probe, so the newest checkpoint at or before that probe and
  every later one may turn out to be a neighbour. The last clean probe only moves forward, so a
  checkpoint this rule lets go is never needed again.

Milestones and neighbours are kept for good and tagged on the trial's run; window checkpoints
are only held back while the window is open. The driver's checkpoint pruner applies these rules
to a one-process trial's checkpoints (Tune's), rank 0 of a data-parallel trial to its copies of
Ray Train's (orchestrator/trials/kept_copies.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from typing import Any

from trainers.config import TrainConfig
from trainers.emergence import keys
from trainers.emergence.monitor import milestone_steps

MILESTONE = "milestone"
BEFORE_EVENT = "before emergence"
AFTER_EVENT = "after emergence"
WINDOW = "window"
FOR_GOOD = (MILESTONE, BEFORE_EVENT, AFTER_EVENT)


@dataclass(frozen=True)
class WatchState:
    """What a trial's latest report says about its emergence watch."""

    monitored: bool  # the trial watches for emergence with probes during training
    last_clean_step: int | None = None  # None: no clean probe yet
    emerged_at_step: int | None = None


def watch_plan(cfg: TrainConfig) -> tuple[list[int], bool]:
    """A trial's milestone steps, and whether it watches for emergence with probes during training."""
    return milestone_steps(cfg.probe.keep_checkpoints_at, cfg.steps), cfg.probe.monitor and cfg.probe.every > 0


def watch_state(monitored: bool, report: Mapping[str, Any]) -> WatchState:
    """The watch's state from a checkpoint report's numbers (trainers/emergence/keys.py)."""
    return WatchState(monitored, _step(report.get(keys.LAST_CLEAN_STEP)), _step(report.get(keys.EMERGED_AT_STEP_VALUE)))


def _step(value: Any) -> int | None:
    """A step reported as a float; -1 (no clean probe yet) and absence are None."""
    return None if value is None or value < 0 else int(value)


def kept_reasons(steps: Iterable[int], milestones: Iterable[int], watch: WatchState) -> dict[int, set[str]]:
    """Step -> why the checkpoint at that step is kept past pruning (steps without a reason may go).
    One checkpoint may have several reasons (a milestone that is also the last one before the event)."""
    steps = sorted(set(steps))
    wanted = set(milestones)
    kept: dict[int, set[str]] = {step: {MILESTONE} for step in steps if step in wanted}
    emerged = watch.emerged_at_step
    if emerged is not None:
        before = [s for s in steps if s < emerged]
        after = [s for s in steps if s >= emerged]
        if before:
            kept.setdefault(before[-1], set()).add(BEFORE_EVENT)
        if after:
            kept.setdefault(after[0], set()).add(AFTER_EVENT)
    elif watch.monitored:
        clean = watch.last_clean_step
        anchor = max((s for s in steps if clean is not None and s <= clean), default=None)
        for step in steps:
            if anchor is None or step >= anchor:
                kept.setdefault(step, set()).add(WINDOW)
    return kept


def storage_uri(path: str, filesystem_type: str) -> str:
    """The URI a tag names for a checkpoint at `path` on a pyarrow filesystem of that type_name."""
    return path if filesystem_type == "local" else f"{filesystem_type}://{path}"


def kept_tags(step: int, uri: str, reasons: set[str]) -> dict[str, str]:
    """The run's tags for a checkpoint newly kept for good: its URI by step, and which side of
    the event it is on when it is one of emergence's neighbours."""
    tags = {keys.kept_checkpoint_tag(step): uri}
    if BEFORE_EVENT in reasons:
        tags[keys.CHECKPOINT_BEFORE] = str(step)
    if AFTER_EVENT in reasons:
        tags[keys.CHECKPOINT_AFTER] = str(step)
    return tags
