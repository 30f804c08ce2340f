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
are only held back while the window is open.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
