"""A tiny sweep through Ray Tune, read back from the MLflow store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.trials.records import RECORDS_KEY
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec
from trainers.probes import names

pytestmark = pytest.mark.slow


def test_tiny_sweep_logs_one_child_run_per_trial(tmp_path) -> None:
    spec = tiny_spec(tmp_path)
    spec["grid"]["steps"] = [2, 4]
    path = write_spec(tmp_path, spec)
    done = run_sweep_cli(tmp_path, str(path), "--set", "train.optim.lr=0.002")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in done.stdout

    # The console: one line per finished trial with its axes, a results table, where to go
    # next; no per-trial configuration boxes, Tune tables or Ray warnings.
    lines = done.stdout.splitlines()
    assert len(lines) < 40, done.stdout
    finished = [line for line in lines if line.startswith("[") and " done " in line]
    assert len(finished) == 4 and all("registers=" in line and "steps=" in line for line in finished)
    assert "Val top-1 by model size, training length and registers" in done.stdout
    assert "python -m orchestrator.analyze --experiment e2e --parent-run" in done.stdout
    assert "then browse http://127.0.0.1:5000/#/experiments/" in done.stdout
    assert "?viewStateShareKey=sweep-axes-metrics" in done.stdout
    for noise in ("╭", "Configuration for experiment", "started with configuration", "Trial status"):
        assert noise not in done.stdout
    assert "WARNING" not in done.stderr and "INFO" not in done.stderr, done.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["overrides"] == "train.optim.lr=0.002"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "spec")} == {"spec/resolved.yaml", "spec/plan.txt"}

    seen = set()
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["trial_id"] and tags["git_commit"]
        assert tags["axis.model_size"] == "micro" and tags["axis.seed"] == "0"
        # One tag per axis: the swept model.num_registers and steps under their short names only.
        study_axes = {"axis.model_size", "axis.num_registers", "axis.steps", "axis.seed", "axis.objective"}
        assert {k for k in tags if k.startswith("axis.")} == study_axes
        assert tags["axis.objective"] == "supervised"
        assert params["optim.lr"] == "0.002"
        seen.add((tags["axis.num_registers"], tags["axis.steps"]))
        steps = int(tags["axis.steps"])
        history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
        assert [m.step for m in history] == list(range(2, steps + 1, 2))
        assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_TOP1)] == list(range(2, steps + 1, 2))
        # Probes ran at the end and wrote their files.
        assert client.get_metric_history(run.info.run_id, names.outlier_frac(names.OUTPUT))[-1].step == steps
        files = {a.path for a in client.list_artifacts(run.info.run_id, names.artifact_dir(steps))}
        assert f"{names.artifact_dir(steps)}/{names.NORMS_FILE}" in files
        assert tags["checkpoint_uri"]
    assert seen == {("0", "2"), ("0", "4"), ("2", "2"), ("2", "4")}

    # Tune's own result files are kept; its TensorBoard logger (which imports torch into the
    # driver) is not used.
    trial_dirs = list((tmp_path / "ray_results" / "e2e").glob("trial_*"))
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:
        assert (trial_dir / "result.json").exists() and (trial_dir / "progress.csv").exists()
        assert not list(trial_dir.glob("events.out.tfevents*"))
        # The MLflow records that rode along with each report were taken out before Tune kept the result.
        for name in ("result.json", "progress.csv"):
            assert RECORDS_KEY not in (trial_dir / name).read_text()
