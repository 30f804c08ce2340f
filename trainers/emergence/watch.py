"""The emergence watch inside the training loop: feeds the monitor, probes adaptively, acts.

The trainer calls two methods. `regular_probe(step, scalars)` after each regular probe (rank 0):
the monitor reads the probe's output outlier fraction; if that probe opens a suspicion, the
weight snapshots of the window since the last clean probe are measured first. `after_step`
after every step (every rank): on rank 0 it takes a snapshot or an adaptive probe when one is
due, and at the end it tags how the watch ended; on every rank it returns what the loop must
do now: write a checkpoint (a milestone, or the event was just confirmed, so that its tags and
the checkpoint after it reach the driver at once) and whether to stop.

Nothing here draws random numbers, touches the data iterator or the live model's weights: the
loss history is the same with and without the watch and with and without adaptive probing
(tests/test_emergence_training.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainers.config import TrainConfig
from trainers.emergence import keys
from trainers.emergence.measure import from_probe_scalars, output_artifacts
from trainers.emergence.monitor import Change, EmergenceMonitor, EmergenceRule, Observation, Phase, milestone_steps
from trainers.emergence.snapshots import WeightSnapshots


@dataclass(frozen=True)
class WatchAction:
    checkpoint: bool = False  # write a checkpoint (and report) at this step
    stop: bool = False  # end training after that checkpoint


def set_tags(tracker: Any, tags: Mapping[str, str]) -> None:
    """Trackers that keep tags (the orchestrator's record buffer, MemoryTracker) get them; others do not."""
    setter = getattr(tracker, "set_tags", None)
    if setter is not None and tags:
        setter(dict(tags))


class EmergenceWatch:
    def __init__(
        self,
        cfg: TrainConfig,
        probe_model: Callable[[], torch.nn.Module],
        probe_images: Callable[[], torch.Tensor],
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        p = cfg.probe
        self.enabled = p.monitor
        self.on_emergence = p.on_emergence
        self.steps = cfg.steps
        self.monitor = EmergenceMonitor(
            EmergenceRule(p.emergence_consecutive, p.emergence_min_fraction),
            total_steps=cfg.steps, every=p.every, adaptive=p.adaptive,
        )
        self.milestones = set(milestone_steps(p.keep_checkpoints_at, cfg.steps))
        self.snapshots = WeightSnapshots()
        self.rank, self.world_size, self.device = rank, world_size, device
        self._probe_model = probe_model
        self._probe_images = probe_images
        self._images: torch.Tensor | None = None
        self._probed_at = -1
        self._act_now = WatchAction()
        self.stopped = False
        self.adaptive_probes = 0  # counts, for benchmarks and tests
        self.snapshots_taken = 0

    # ------------------------------------------------------------- rank 0

    def regular_probe(self, step: int, scalars: Mapping[str, float], tracker: Any) -> None:
        if not self.enabled:
            return
        self._probed_at = step
        observation = from_probe_scalars(dict(scalars), step)
        window: list[Observation] = []
        if self.monitor.opens_suspicion(observation):
            # The onset lies after the last clean probe: measure the copies kept since then.
            start = self.monitor.window_start()
            for past, (frac, ratio) in self.snapshots.measured(self._probe_model(), start, step, self._measure_model):
                window.append(Observation(past, frac, ratio, regular=False))
        self._record(tracker, *window, observation)
        self.snapshots.drop_through(step)

    def after_step(self, step: int, tracker: Any, *, done: bool, probed: bool) -> WatchAction:
        """Every rank, after every step; `probed`: a regular probe was due at this step (on rank 0)."""
        if self.enabled and self.rank == 0:
            if self._probed_at != step:
                if self.monitor.adaptive_probe_due(step):
                    frac, ratio = self._measure_model(self._probe_model())
                    self.adaptive_probes += 1
                    self._record(tracker, Observation(step, frac, ratio, regular=False))
                elif self.monitor.snapshot_due(step):
                    self.snapshots.take(step, self._probe_model())
                    self.snapshots_taken += 1
            if done:
                status = self.monitor.status()
                if status is not None and status != keys.STATUS_EMERGED:
                    set_tags(tracker, {keys.STATUS: status})
        action = WatchAction(checkpoint=self._act_now.checkpoint or step in self.milestones, stop=self._act_now.stop)
        self._act_now = WatchAction()
        if self.enabled and self.world_size > 1 and probed:
            action = self._agree(action)  # only a regular probe can confirm: the one step ranks must agree on
        self.stopped = self.stopped or action.stop
        return action

    def report_values(self) -> dict[str, float]:
        """Numbers for the checkpoint report (rank 0; empty when the watch is off)."""
        if not self.enabled or self.rank != 0:
            return {}
        values = self.monitor.report_values()
        if self.monitor.emerged_at is not None and self.on_emergence == "alert":
            values[keys.ALERT_VALUE] = 1.0
        if self.stopped:
            values[keys.STOPPED_VALUE] = 1.0
        return values

    # -------------------------------------------------------------- internals

    def _measure_model(self, model: torch.nn.Module) -> tuple[float, float]:
        if self._images is None:
            self._images = self._probe_images()
        return output_artifacts(model, self._images)

    def _record(self, tracker: Any, *observations: Observation) -> None:
        for obs in observations:
            tracker.log_metrics({keys.OUTLIER_FRAC: obs.outlier_frac, keys.MAX_OVER_MEDIAN: obs.max_over_median}, obs.step)
        change = self.monitor.observe(*observations)
        self._act_on(change, max(o.step for o in observations), tracker)

    def _act_on(self, change: Change, step: int, tracker: Any) -> None:
        if not change.confirmed:
            return
        tags = self.monitor.event_tags()
        stop = self.on_emergence == "stop" and step < self.steps
        if self.on_emergence == "alert":
            tags[keys.ALERT] = "true"
        if stop:
            onset = self.monitor.emerged_at
            tags[keys.STOPPED_AT_STEP] = str(step)
            tags[keys.STOP_REASON] = (
                f"artifacts emerged at step {onset} (confirmed at step {step}); probe.on_emergence is 'stop'"
            )
        set_tags(tracker, tags)
        # Report now: the tags travel with this report, and the checkpoint after the event exists.
        self._act_now = WatchAction(checkpoint=True, stop=stop)
        self.snapshots.clear()
        assert self.monitor.phase is Phase.EMERGED

    def _agree(self, action: WatchAction) -> WatchAction:
        """Rank 0 decided; every rank takes its decision (a stop must end every rank's loop)."""
        flags = torch.tensor([action.checkpoint, action.stop], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(flags, src=0)
        return WatchAction(checkpoint=bool(flags[0]), stop=bool(flags[1]))

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {**self.monitor.state_dict(), "stopped": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.monitor.load_state_dict(dict(state))
        self.stopped = bool(state.get("stopped", False))
