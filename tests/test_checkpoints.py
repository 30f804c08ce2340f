"""CheckpointPruner: superseded checkpoints go only after a grace period, or at the end."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

from ray.tune import Checkpoint

from orchestrator.trials.checkpoint_pruner import CheckpointPruner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_checkpoints(trial_dir: Path, count: int) -> list[Checkpoint]:
    checkpoints = []
    for index in range(count):
        folder = trial_dir / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x")
        checkpoints.append(Checkpoint.from_directory(str(folder)))
    return checkpoints


def remaining(trial_dir: Path) -> list[str]:
    return sorted(p.name for p in trial_dir.iterdir())


def test_superseded_checkpoints_wait_out_the_grace_period(tmp_path: Path) -> None:
    clock = Clock()
    pruner = CheckpointPruner(keep=2, grace_s=120.0, clock=clock)
    trial = SimpleNamespace(trial_id="a")
    first, second, third, fourth = write_checkpoints(tmp_path / "a", 4)

    for checkpoint in (first, second, third):
        pruner.on_checkpoint(0, [], trial, checkpoint)
    clock.now += 60
    pruner.on_step_end(0, [])
    assert remaining(tmp_path / "a") == [f"checkpoint_{i:06d}" for i in range(4)]  # _000000 is 60 s superseded

    pruner.on_checkpoint(0, [], trial, fourth)  # supersedes checkpoint_000001 now, 60 s after _000000
    clock.now += 61
    pruner.on_step_end(0, [])
    assert remaining(tmp_path / "a") == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]

    clock.now += 60
    pruner.on_step_end(0, [])
    assert remaining(tmp_path / "a") == ["checkpoint_000002", "checkpoint_000003"]


def test_experiment_end_keeps_only_the_newest(tmp_path: Path) -> None:
    pruner = CheckpointPruner(keep=2, grace_s=120.0, clock=Clock())
    for name in ("a", "b"):
        for checkpoint in write_checkpoints(tmp_path / name, 5):
            pruner.on_checkpoint(0, [], SimpleNamespace(trial_id=name), checkpoint)
    pruner.on_experiment_end([])
    for name in ("a", "b"):
        assert remaining(tmp_path / name) == ["checkpoint_000003", "checkpoint_000004"]


def test_a_checkpoint_already_gone_is_not_an_error(tmp_path: Path) -> None:
    pruner = CheckpointPruner(keep=1, grace_s=0.0, clock=Clock())
    trial = SimpleNamespace(trial_id="a")
    first, second = write_checkpoints(tmp_path / "a", 2)
    pruner.on_checkpoint(0, [], trial, first)
    (tmp_path / "a" / "checkpoint_000000" / "state.pt").unlink()
    (tmp_path / "a" / "checkpoint_000000").rmdir()
    pruner.on_checkpoint(0, [], trial, second)
    assert pruner.prune(Clock()(), grace_s=0.0) == 1
    assert remaining(tmp_path / "a") == ["checkpoint_000001"]


def test_pickled_pruner_carries_no_bookkeeping(tmp_path: Path) -> None:
    pruner = CheckpointPruner(keep=2)
    (checkpoint,) = write_checkpoints(tmp_path / "a", 1)
    pruner.on_checkpoint(0, [], SimpleNamespace(trial_id="a"), checkpoint)
    restored = pickle.loads(pickle.dumps(pruner))
    assert restored.kept == {} and restored.keep == 2
