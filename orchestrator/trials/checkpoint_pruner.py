"""Deleting a trial's superseded checkpoints late enough that a resume can still find them.

With `CheckpointConfig(num_to_keep=K)`, Tune (2.60) deletes a trial's oldest checkpoint as
soon as a newer one registers, before the experiment state that points at the newer one
has reached storage (the state is uploaded in the background). A sweep killed in between
leaves a saved state whose trial points at a deleted checkpoint, and on resume that trial
fails with "Could not recover from checkpoint as it does not exist on storage anymore".

So Tune keeps every checkpoint (num_to_keep=None) and this driver callback deletes one
only after it has been out of a trial's newest `keep` for `grace_s` seconds, far longer
than Tune takes to save and upload its state (every ~10 s: STATE_SYNC_S in
orchestrator/launch/tuner.py), and at the end of the experiment, after Tune's final state
upload has finished. Disk use stays bounded:
`keep` checkpoints per trial plus those written in the last `grace_s` seconds.

Some checkpoints are kept for good (orchestrator/trials/kept_checkpoints.py): those at the
fractions of training `probe.keep_checkpoints_at` lists, and the two either side of the step
where artifacts emerged; while a trial's emergence watch has a window open, the checkpoints that
may turn out to be those two are held back too. Each checkpoint kept for good is reported to
`on_tags` (the MLflow logger), which tags the trial's run with its step and URI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pyarrow.fs
from ray.tune import Callback
from ray.tune.experiment import Trial

from orchestrator.trials.kept_checkpoints import FOR_GOOD, kept_reasons, kept_tags, storage_uri, watch_plan, watch_state

PRUNE_EVERY_S = 1.0  # on_step_end runs every controller loop; scanning the lists once a second is plenty


@dataclass
class KeptCheckpoint:
    path: str
    filesystem: pyarrow.fs.FileSystem | None
    superseded_at: float | None = None  # when `keep` newer ones existed and nothing held it (monotonic clock)
    step: int | None = None  # the training step it holds (from the report it came with)
    kept_for_good: set[str] = field(default_factory=set)  # why it is never deleted (kept_checkpoints.FOR_GOOD)

    @property
    def uri(self) -> str:
        return storage_uri(self.path, self.filesystem.type_name if self.filesystem is not None else "local")


Tagger = Callable[[Trial, Mapping[str, str]], None]


class CheckpointPruner(Callback):
    def __init__(
        self,
        keep: int = 2,
        grace_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_tags: Tagger | None = None,
    ) -> None:
        self.keep = keep
        self.grace_s = grace_s
        self.clock = clock
        self.on_tags = on_tags  # tags the trial's run with the checkpoints kept for good
        self.kept: dict[str, list[KeptCheckpoint]] = {}
        self.milestones: dict[str, tuple[list[int], bool]] = {}  # per trial: milestone steps, monitored
        self.last_prune = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the Tuner's state at the start: the lists are this driver's bookkeeping.
        # After a crash, checkpoints superseded in the last grace_s seconds stay on storage.
        return {**self.__dict__, "kept": {}, "milestones": {}, "last_prune": float("-inf")}

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any) -> None:
        # Tune processes a report's result (trial.last_result) before the checkpoint it carries.
        result = getattr(trial, "last_result", None) or {}
        kept = self.kept.setdefault(trial.trial_id, [])
        step = result.get("step")
        kept.append(KeptCheckpoint(checkpoint.path, checkpoint.filesystem, step=int(step) if step is not None else None))
        milestones, monitored = self._trial_plan(trial)
        watch = watch_state(monitored, result)
        reasons = kept_reasons([c.step for c in kept if c.step is not None], milestones, watch)
        now = self.clock()
        newest = kept[-self.keep :]
        for old in kept:
            why = reasons.get(old.step, set()) if old.step is not None else set()
            new = (why & set(FOR_GOOD)) - old.kept_for_good
            if new:
                old.kept_for_good |= new
                self._tag(trial, old, new)
            held = old in newest or bool(why) or bool(old.kept_for_good)
            if held:
                old.superseded_at = None
            elif old.superseded_at is None:
                old.superseded_at = now

    def _trial_plan(self, trial: Trial) -> tuple[list[int], bool]:
        """The trial's milestone steps and whether it watches for emergence, from its config."""
        if trial.trial_id not in self.milestones:
            from orchestrator.trials.trainable import trial_config

            config = getattr(trial, "config", None) or {}
            if "train" not in config:  # not one of our trials (a test's stand-in): newest `keep` only
                return [], False
            self.milestones[trial.trial_id] = watch_plan(trial_config(config["train"], config["trial"]["axes"]))
        return self.milestones[trial.trial_id]

    def _tag(self, trial: Trial, checkpoint: KeptCheckpoint, reasons: set[str]) -> None:
        if self.on_tags is None or checkpoint.step is None:
            return
        self.on_tags(trial, kept_tags(checkpoint.step, checkpoint.uri, reasons))

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = self.clock()
        if now - self.last_prune >= PRUNE_EVERY_S:
            self.last_prune = now
            self.prune(now, self.grace_s)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Tune has uploaded its final state (tune.run waits for it before this callback):
        # nothing points at a superseded checkpoint any more.
        self.prune(self.clock(), grace_s=0.0)

    def prune(self, now: float, grace_s: float) -> int:
        """Delete checkpoints superseded at least `grace_s` ago; returns how many."""
        deleted = 0
        for kept in self.kept.values():
            due = [c for c in kept if c.superseded_at is not None and now - c.superseded_at >= grace_s]
            for checkpoint in due:
                delete_checkpoint(checkpoint)
                kept.remove(checkpoint)
                deleted += 1
        return deleted


def delete_checkpoint(checkpoint: KeptCheckpoint) -> None:
    filesystem = checkpoint.filesystem or pyarrow.fs.LocalFileSystem()
    try:
        filesystem.delete_dir(checkpoint.path)
    except FileNotFoundError:
        pass  # already gone (deleted by hand, or a node's local disk went with the node)
