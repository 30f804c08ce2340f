"""Where an analysis run goes and what it is called: next to the launch it analysed."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers_mlflow_store import write_sweep
from orchestrator.analyze.load import load_sweep
from orchestrator.analyze.publish import analysis_run_place
from orchestrator.stores.mlflow_runs import child_runs


def test_one_launch_nests_the_analysis_and_several_launches_name_their_count(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = write_sweep(uri, "regs", register_counts=(0, 4))
    second = write_sweep(uri, "regs", register_counts=(1, 2))  # other settings: the analysis keeps both
    client = MlflowClient(uri)

    # --parent-run: that launch only, nested under it and named after it.
    one = load_sweep("regs", uri, parent_run=second.parent_run_id)
    assert analysis_run_place(client, one, second.parent_run_id) == (
        f"analysis {second.parent_run_name}", second.parent_run_id
    )
    # The whole experiment with two launches: a top-level run that says it pools them.
    both = load_sweep("regs", uri)
    assert analysis_run_place(client, both, None) == ("analysis regs (2 launches)", None)

    # An analysis nested under a launch is not one of its trials.
    client.create_run(first.experiment_id, tags={"mlflow.parentRunId": first.parent_run_id, "sweep.role": "analysis"})
    assert {r.info.run_id for r in child_runs(client, first.experiment_id, first.parent_run_id)} == {
        run_id for run_id, _ in first.trial_runs.values()
    }


def test_an_experiment_with_one_launch_nests_its_analysis_without_being_told(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    only = write_sweep(uri, "regs", register_counts=(0, 4))
    sweep = load_sweep("regs", uri)
    assert analysis_run_place(MlflowClient(uri), sweep, None) == (f"analysis {only.parent_run_name}", only.parent_run_id)
