"""A trial the scheduler stopped early: its run says at which step and why, and the analysis
leaves it out of the final-length tables and says so. (A real ASHA sweep of sweeps/search_lr.yaml
runs in test_shipped_specs.py.)"""

from __future__ import annotations

import pickle
from pathlib import Path

from orchestrator.analyze.load import Sweep, _classify, _RawRun
from orchestrator.analyze.pipeline import skipped_summary
from orchestrator.launch.tuner import scheduler_summary
from orchestrator.spec.schema import parse_spec
from orchestrator.trials.mlflow_logger import MlflowTrialLogger, SweepContext
from test_failures import UnitTrial, unit_logger


def test_a_stopped_trial_is_tagged_with_its_step_and_the_scheduler(tmp_path: Path) -> None:
    client, experiment_id, plain = unit_logger(tmp_path)
    spec = parse_spec({
        "name": "s", "train": {"steps": 60, "eval_every": 10},
        "scheduler": {"metric": "val/loss", "mode": "min", "grace_period": 20},
    })
    described, metric = scheduler_summary(spec)
    callback = MlflowTrialLogger(SweepContext(plain.context.tracking_uri, experiment_id, "parent", "abc", described, metric))
    callback = pickle.loads(pickle.dumps(callback))  # as Tuner.restore brings it back

    stopped, finished = UnitTrial("t1", ""), UnitTrial("t2", "")
    steps = int(stopped.config["train"]["steps"])
    stopped.last_result = {"step": 2, "val/loss": 1.23456}
    finished.last_result = {"step": steps, "val/loss": 0.5}
    for trial in (stopped, finished):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_complete(0, [], trial)
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment_id])}
    tags = runs["t1"].data.tags
    assert runs["t1"].info.status == "FINISHED" and tags["stopped_early.step"] == "2"
    assert tags["stopped_early.reason"] == (
        f"stopped by ASHA on val/loss (min; grace period 20 steps, reduction factor 3) at step 2 of {steps}"
        " with val/loss = 1.235: below its rung's cutoff"
    )
    assert not any(k.startswith("stopped_early") for k in runs["t2"].data.tags)


def raw(run_id: str, **tags: str) -> _RawRun:
    axes = {"axis.model_size": "micro", "axis.num_registers": "0", "axis.steps": "60", "axis.seed": run_id}
    return _RawRun(run_id, "FINISHED", None, 0, {"trial_id": run_id, **axes, **tags}, {})


def test_the_analysis_leaves_stopped_trials_out_and_says_how_many_and_why() -> None:
    reason = "stopped by ASHA on val/loss (min) at step 20 of 60 with val/loss = 1.8: below its rung's cutoff"
    runs = [
        raw("a"), raw("b", **{"stopped_early.step": "20", "stopped_early.reason": reason}),
        raw("c", **{"stopped_early.step": "40"}),
        _RawRun("d", "FAILED", None, 0, {"trial_id": "d"}, {}),
    ]
    trials, stopped, skipped, _ = _classify(runs)
    assert [t.run_id for t in trials] == ["a"]  # the only 60-step result
    by_id = {s.run_id: s for s in skipped}
    assert by_id["b"].reason == reason and by_id["b"].stopped_at_step == 20
    assert by_id["c"].stopped_at_step == 40 and "step 40" in by_id["c"].reason
    sweep = Sweep("e", "1", "sqlite://", trials, skipped, history=None)  # type: ignore[arg-type]
    assert skipped_summary(sweep) == (
        "3 runs skipped (1 FAILED; 2 stopped early, at steps 20 and 40,"
        " so their metrics are not those of their full length (their probes still count in the emergence map))"
    )
