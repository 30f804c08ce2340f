"""The register-depth specs: the GPU spec plans what its header says, and the CPU variant runs end
to end (one launch through Ray Tune into MLflow, then the analysis, grouped by depth)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.spec.errors import SpecError
from orchestrator.spec.plan import make_plan
from orchestrator.spec.schema import load_spec
from sweep_helpers import ROOT, run_sweep_cli, sweep_env

SWEEPS = ROOT / "sweeps"


def test_the_gpu_spec_plans_deit3_small_with_4_registers_at_four_depths_and_a_baseline() -> None:
    plan = make_plan(load_spec(SWEEPS / "register_depth.yaml"))
    settings = [(t.config.model.num_registers, t.config.model.register_depth) for t in plan.trials]
    # The grid crosses [0, 4] with four depths; without registers every depth is one model, kept once.
    assert settings == [(0, 0), (4, 0), (4, 3), (4, 6), (4, 9)]
    assert [t.axes["model.register_depth"] for t in plan.trials] == [0, 0, 3, 6, 9]
    assert {t.config.model.size for t in plan.trials} == {"small"} and plan.trials[0].config.augment.three_augment
    # Later entry, fewer tokens in the first blocks: each later depth costs a little less.
    flops = [t.flops for t in plan.trials[1:]]
    assert flops == sorted(flops, reverse=True) and flops[-1] > 0.97 * flops[0]
    header = (SWEEPS / "register_depth.yaml").read_text()
    total = sum(t.gpu_hours for t in plan.trials)
    assert f"{total:.1f} GPU-hours" in header  # the dry-run cost the header states is the plan's


def test_a_depth_without_registers_is_one_trial_and_alone_still_refused() -> None:
    spec = load_spec(SWEEPS / "register_depth_cpu.yaml", ["grid.model.num_registers=[0]"])
    assert [(t.config.model.num_registers, t.config.model.register_depth) for t in make_plan(spec).trials] == [(0, 0)]
    # Without a register axis to cross, a depth on the base's 0 registers names no model at all.
    with pytest.raises(SpecError, match="register_depth 1 places registers, but num_registers is 0"):
        load_spec(SWEEPS / "register_depth_cpu.yaml", ["train.model.num_registers=0", "grid.model.num_registers=null"])


# A third of the spec's 300 steps (micro reaches 0.63-0.76 top-1 there, README), a smaller
# validation split: the launch and the analysis as the header runs them, in less time.
SHRINK = [
    "--set", "train.steps=100", "--set", "train.eval_every=50", "--set", "train.probe.every=50",
    "--set", "train.data.val_size=128",
]


@pytest.mark.slow  # one launch (5 micro trials) and the analysis: about 4 min on 2 cores shared with other jobs
def test_cpu_depth_sweep_then_analysis_groups_by_registers_and_depth(tmp_path: Path) -> None:
    shutil.copytree(SWEEPS, tmp_path / "sweeps")
    spec = "sweeps/register_depth_cpu.yaml"
    first = run_sweep_cli(tmp_path, spec, *SHRINK)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "r4@3" in first.stdout and "5 trials" in first.stdout  # the results table by (registers, depth)

    analysed = subprocess.run(
        [sys.executable, "-m", "orchestrator.analyze", "--experiment", "register_depth_cpu", "--out", "out"],
        cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert analysed.returncode == 0, analysed.stdout[-3000:] + analysed.stderr[-3000:]
    out = tmp_path / "out"
    stats = pd.read_csv(out / "register_effect.csv")
    settings = set(zip(stats["num_registers"], stats["register_depth"]))
    assert settings == {(0, 0), (4, 0), (4, 1), (4, 2), (4, 3)}
    top1 = stats[stats["metric"] == "top1"]
    assert len(top1) == 5 and (top1["mean"] > 1 / 6 + 0.1).all()  # every setting learns the shapes (chance 1/6)
    report = (out / "report.md").read_text()
    assert "register depths (the block the registers enter before): 0, 1, 2 and 3" in report
    assert "Recommendation rule: over the pair (register count, register depth)" in report
    assert "| registers | depth 0 | depth 1 | depth 2 | depth 3 |" in report
    assert "outlier fraction (output), against (registers, depth):" in report
    assert "val top-1, against (registers, depth):" in report
    assert "| 4@3 trained |" in report  # beside the test-time register of the no-register trial
    assert (out / "figures" / "register_depth_effect.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recommendation"]["covers_depth"] is True

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("register_depth_cpu")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep.role") == "trial"]
    depths = sorted((r.data.tags["axis.num_registers"], r.data.tags["axis.model.register_depth"]) for r in trials)
    assert depths == [("0", "0"), ("4", "0"), ("4", "1"), ("4", "2"), ("4", "3")]
    # Each late trial's probes measured its registers from the block they enter.
    late = next(r for r in trials if r.data.tags["axis.model.register_depth"] == "2")
    history = client.get_run(late.info.run_id).data.metrics
    assert "probe/norm_mean/reg/block_02" in history and "probe/norm_mean/reg/block_01" not in history
