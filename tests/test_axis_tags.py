"""One MLflow tag per swept axis: short names for the study axes, the config path for the rest."""

from __future__ import annotations

from orchestrator.analyze.load import _classify, _RawRun
from orchestrator.trials.trainable import axis_tags, trial_config

BASE = {"model": {"size": "micro", "num_registers": 0}, "steps": 10}


def test_each_axis_is_tagged_once() -> None:
    axes = {"model.num_registers": 4, "model.size": "mini", "steps": 20, "seed": 1, "optim.lr": 0.002}
    tags = axis_tags(trial_config(BASE, axes), axes)
    assert tags == {
        "axis.model_size": "mini",
        "axis.num_registers": "4",
        "axis.steps": "20",
        "axis.seed": "1",
        "axis.objective": "supervised",
        "axis.optim.lr": "0.002",
    }


def test_study_axes_are_tagged_when_not_swept() -> None:
    tags = axis_tags(trial_config(BASE, {"model.num_registers": 2}), {"model.num_registers": 2})
    assert tags == {
        "axis.model_size": "micro", "axis.num_registers": "2", "axis.steps": "10", "axis.seed": "0",
        "axis.objective": "supervised",
    }


def raw_run(run_id: str, tags: dict[str, str]) -> _RawRun:
    return _RawRun(run_id, "FINISHED", None, 0, {"trial_id": run_id, **tags}, {})


def test_the_analysis_reads_old_runs_with_path_named_copies_and_new_runs_alike() -> None:
    study = {"axis.model_size": "mini", "axis.num_registers": "4", "axis.steps": "20", "axis.seed": "0"}
    old = raw_run("old", {**study, "axis.model.size": "mini", "axis.model.num_registers": "4"})
    new = raw_run("new", {**study, "axis.seed": "1", "axis.optim.lr": "0.002"})
    trials, _, skipped, _ = _classify([old, new])
    assert not skipped
    by_id = {t.run_id: t for t in trials}
    assert by_id["old"].other_axes == ()  # the copies are no further swept keys
    assert by_id["new"].other_axes == (("axis.optim.lr", "0.002"),)
    assert {(t.model_size, t.num_registers, t.steps) for t in trials} == {("mini", 4, 20)}
