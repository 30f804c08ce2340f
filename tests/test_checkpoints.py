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


# ------------------------------------------------- checkpoints kept past pruning (issue 25)


def emergence_trial(**probe) -> SimpleNamespace:
    from trainers.config import ProbeConfig, TrainConfig

    train = TrainConfig(steps=100, probe=ProbeConfig(every=10, **probe)).model_dump(mode="json")
    return SimpleNamespace(trial_id="e", config={"train": train, "trial": {"index": 0, "axes": {}}}, last_result={})


def report(pruner, trial, checkpoint, step: int, **values: float) -> None:
    """A report carrying `checkpoint` at `step`, with the emergence watch's values."""
    from trainers.emergence import keys

    names = {"last_clean": keys.LAST_CLEAN_STEP, "emerged_at": keys.EMERGED_AT_STEP_VALUE}
    trial.last_result = {"step": step, **{names[k]: float(v) for k, v in values.items()}}
    pruner.on_checkpoint(0, [], trial, checkpoint)


def test_milestones_and_the_event_neighbours_are_kept_and_tagged(tmp_path: Path) -> None:
    from trainers.emergence import keys

    tags: dict[str, str] = {}
    pruner = CheckpointPruner(keep=1, grace_s=0.0, clock=Clock(), on_tags=lambda trial, t: tags.update(t))
    trial = emergence_trial(keep_checkpoints_at=[0.25])
    checkpoints = write_checkpoints(tmp_path / "e", 8)  # at steps 10, 20, ..., 80
    # Clean probes up to 30; 40 and 50 flagged; confirmed at 60 with the onset at 36 (adaptive).
    for index, step in enumerate(range(10, 81, 10)):
        values = {"last_clean": min(step, 30)} if step < 60 else {"last_clean": 30, "emerged_at": 36}
        report(pruner, trial, checkpoints[index], step, **values)
        if step == 50:  # the window: the newest checkpoint at or before the last clean probe, and later ones
            pruner.prune(Clock()(), grace_s=0.0)
            # Steps 10 and 20 went; 30 (at the last clean probe), 40 and 50 stay; 60-80 are not reported yet.
            assert remaining(tmp_path / "e") == [f"checkpoint_{i:06d}" for i in range(2, 8)]
    pruner.on_experiment_end([])
    # 25 -> no checkpoint at step 25 (milestone of 100 steps); before 36: step 30; after: step 40; newest: 80.
    assert remaining(tmp_path / "e") == ["checkpoint_000002", "checkpoint_000003", "checkpoint_000007"]
    assert tags[keys.CHECKPOINT_BEFORE] == "30" and tags[keys.CHECKPOINT_AFTER] == "40"
    assert tags[keys.kept_checkpoint_tag(30)].endswith("checkpoint_000002")
    assert sorted(k for k in tags if keys.kept_checkpoint_step(k) is not None) == [keys.kept_checkpoint_tag(s) for s in (30, 40)]


def test_a_milestone_checkpoint_is_kept_for_good(tmp_path: Path) -> None:
    from trainers.emergence import keys

    tags: dict[str, str] = {}
    pruner = CheckpointPruner(keep=1, grace_s=0.0, clock=Clock(), on_tags=lambda trial, t: tags.update(t))
    trial = emergence_trial(keep_checkpoints_at=[0.2, 0.5], monitor=False)
    for index, checkpoint in enumerate(write_checkpoints(tmp_path / "e", 5)):
        report(pruner, trial, checkpoint, 20 * (index + 1))  # 20, 40, ..., 100
    pruner.on_experiment_end([])
    assert remaining(tmp_path / "e") == ["checkpoint_000000", "checkpoint_000004"]  # step 20 and the newest
    assert list(tags) == [keys.kept_checkpoint_tag(20)]  # step 50 had no checkpoint: nothing to keep there


def test_a_milestone_that_is_also_the_last_before_the_event_gets_both_tags(tmp_path: Path) -> None:
    from trainers.emergence import keys

    tags: dict[str, str] = {}
    pruner = CheckpointPruner(keep=1, grace_s=0.0, clock=Clock(), on_tags=lambda trial, t: tags.update(t))
    trial = emergence_trial(keep_checkpoints_at=[0.2])
    first, second, third = write_checkpoints(tmp_path / "e", 3)
    report(pruner, trial, first, 20, last_clean=20)
    report(pruner, trial, second, 40, last_clean=20)
    report(pruner, trial, third, 60, last_clean=20, emerged_at=30)
    assert tags[keys.CHECKPOINT_BEFORE] == "20" and tags[keys.CHECKPOINT_AFTER] == "40"
