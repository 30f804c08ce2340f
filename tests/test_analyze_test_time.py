"""The sweep analysis puts test-time registers beside trained ones: on a planted store whose
no-register trials have real final checkpoints with a planted register neuron (every eighth
patch position), the test-time column must show the artifacts gone."""

from __future__ import annotations

import pandas as pd
import pytest
from planted_store import plant_sweep

from orchestrator.analyze import run_analysis
from orchestrator.analyze.test_time import MOVED, TTR_ROW, UNREADABLE, comparison_table

pytestmark = pytest.mark.slow  # planting, four checkpoints measured twice, and the analysis' figures: ~35 s on 2 cores

PLANTED_FRAC = 1 / 8  # planted_trial_checkpoint: a register neuron fires at every eighth patch


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_ttr")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    sweep = plant_sweep(
        uri, sizes=("micro", "mini"), registers=(0, 4), lengths=(100,), seeds=(0, 1),
        probe_files=False, unfinished=False, checkpoints=folder / "checkpoints",
    )
    return uri, sweep, run_analysis(sweep.experiment, folder / "out", tracking_uri=uri, log_to_mlflow=False)


def test_every_no_register_trial_gets_a_test_time_register(analysed):
    _, _, result = analysed
    trials = result.test_time.trials
    assert sorted(zip(trials["model_size"], trials["seed"])) == [("micro", "0"), ("micro", "1"), ("mini", "0"), ("mini", "1")]
    assert set(trials["status"]) == {MOVED}
    assert all(n.split()[0] == "1:7" for n in trials["neurons"])  # the planted unit, ranked first
    assert (trials["baseline_outlier_frac"] == PLANTED_FRAC).all()
    assert (trials["ttr_outlier_frac"] == 0.0).all()
    assert trials["ttr_top1"].between(0, 1).all() and trials["ttr_miou"].notna().all()


def test_the_report_puts_the_test_time_row_between_none_and_trained(analysed):
    _, _, result = analysed
    table = comparison_table(result.stats, result.test_time, "mini", 100)
    assert list(table["registers"]) == ["none", TTR_ROW, "4 trained"]
    row = table.set_index("registers")
    assert row.loc[TTR_ROW, "outlier_frac"].startswith("0 [")  # two seeds, both 0
    assert float(row.loc["none", "outlier_frac"].split()[0]) == pytest.approx(0.03, abs=0.005)  # what the trials logged
    report = result.report_path.read_text()
    assert "## Test-time registers beside trained registers" in report
    assert "### mini, 100 training steps" in report and f"| {TTR_ROW} | 0 [" in report
    csv = pd.read_csv(result.out_dir / "test_time_registers.csv")
    assert len(csv) == 4 and set(csv["status"]) == {MOVED}


def test_a_checkpoint_that_disagrees_with_the_logged_values_is_a_caveat(analysed):
    _, _, result = analysed
    # The planted trials logged synthetic outlier fractions (~0.03); their checkpoints give 1/8.
    assert any("give another output outlier fraction than they logged" in c for c in result.caveats)


def test_without_checkpoints_the_row_says_so_and_the_switch_skips_it(analysed, tmp_path):
    uri, _, _ = analysed
    sweep = plant_sweep(uri, "no_checkpoints", sizes=("micro",), registers=(0, 4), lengths=(100,), seeds=(0,),
                        probe_files=False, unfinished=False)
    result = run_analysis(sweep.experiment, tmp_path / "a", tracking_uri=uri, log_to_mlflow=False)
    assert set(result.test_time.trials["status"]) == {UNREADABLE}
    assert any("no readable checkpoint" in c for c in result.caveats)
    table = comparison_table(result.stats, result.test_time, "micro", 100).set_index("registers")
    assert table.loc[TTR_ROW, "outlier_frac"] == UNREADABLE
    skipped = run_analysis(sweep.experiment, tmp_path / "b", tracking_uri=uri, log_to_mlflow=False, test_time_registers=False)
    assert skipped.test_time is None and "Test-time registers" not in skipped.report_path.read_text()
