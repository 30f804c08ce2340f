"""Deleting a trial's superseded checkpoints late enough that a resume can still find them.

With `CheckpointConfig(num_to_keep=K)`, Tune (2.60) deletes a trial's oldest checkpoint as
soon as a newer one registers, before the experiment state that points at the newer one
has reached storage (the state is uploaded in the background). A sweep killed in between
leaves a saved state whose trial points at a deleted checkpoint, and on resume that trial
fails with "Could not recover from checkpoint as it does not exist on storage anymore".

So Tune keeps every checkpoint (num_to_keep=None) and this driver callback deletes one
only after it has been out of a trial's newest `keep` for `grace_s` seconds, far longer
than Tune takes to save and upload its state (every ~10 s), and at the end of the
experiment, after Tune's final state upload has finished. Disk use stays bounded:
`keep` checkpoints per trial plus those written in the last `grace_s` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs
from ray.tune import Callback
from ray.tune.experiment import Trial

PRUNE_EVERY_S = 1.0  # on_step_end runs every controller loop; scanning the lists once a second is plenty


@dataclass
class KeptCheckpoint:
    path: str
    filesystem: pyarrow.fs.FileSystem | None
    superseded_at: float | None = None  # when `keep` newer ones existed (monotonic clock)


class CheckpointPruner(Callback):
    def __init__(self, keep: int = 2, grace_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep = keep
        self.grace_s = grace_s
        self.clock = clock
        self.kept: dict[str, list[KeptCheckpoint]] = {}
        self.last_prune = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the Tuner's state at the start: the lists are this driver's bookkeeping.
        # After a crash, checkpoints superseded in the last grace_s seconds stay on storage.
        return {**self.__dict__, "kept": {}, "last_prune": float("-inf")}

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any) -> None:
        kept = self.kept.setdefault(trial.trial_id, [])
        kept.append(KeptCheckpoint(checkpoint.path, checkpoint.filesystem))
        now = self.clock()
        for old in kept[: -self.keep]:
            if old.superseded_at is None:
                old.superseded_at = now

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
