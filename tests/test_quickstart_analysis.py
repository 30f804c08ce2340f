"""The README's path end to end: the quickstart spec (shrunk with --set) through Ray Tune
into MLflow, then `python -m orchestrator.analyze` on what it wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from sweep_helpers import ROOT, run_sweep_cli, sweep_env

pytestmark = pytest.mark.slow

SHRINK = [
    "--set", "grid.model.num_registers=[0,4]",
    "--set", "grid.steps=[8]",
    "--set", "train.eval_every=4",
    "--set", "train.log_every=2",
    "--set", "train.probe.every=4",
    "--set", "train.optim.batch_size=16",
    "--set", "train.data.val_size=32",
]


def test_quickstart_sweep_then_analysis(tmp_path) -> None:
    shutil.copytree(ROOT / "sweeps", tmp_path / "sweeps")
    done = run_sweep_cli(tmp_path, "sweeps/quickstart.yaml", *SHRINK)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    analysed = subprocess.run(
        [sys.executable, "-m", "orchestrator.analyze", "--experiment", "quickstart", "--out", "out"],
        cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert analysed.returncode == 0, analysed.stdout[-3000:] + analysed.stderr[-3000:]
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "micro" in report and "mini" in report
    summary = json.loads((out / "summary.json").read_text())
    # Eight steps teach nothing: the report says so (chance from the trials' class-count tag)
    # and, instead of a register count, names the command that would give it data to judge.
    assert [c["chance"] for c in summary["learning"]] == [1 / 6, 1 / 6]
    assert [c["learned"] for c in summary["learning"]] == [False, False]
    assert summary["recommendation"]["num_registers"] is None
    assert "python -m orchestrator.sweep sweeps/quickstart.yaml --set 'grid.steps=[32]'" in report
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures, "the analysis drew no figures"
    # Test-time registers found every no-register trial's final checkpoint through its run's tag.
    test_time = (out / "test_time_registers.csv").read_text().splitlines()
    assert len(test_time) == 3 and "no checkpoint" not in "".join(test_time[1:]), test_time

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags.get("sweep.role", "") for r in runs)
    assert roles.count("trial") == 4 and roles.count("parent") == 1 and roles.count("analysis") == 1
