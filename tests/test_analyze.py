"""The analysis on a planted sweep must find exactly the planted answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.analyze import run_analysis
from orchestrator.analyze.load import load_sweep
from planted_store import ARTIFACT_SIZE, plant_sweep

pytestmark = pytest.mark.slow  # planting 74 runs into SQLite and drawing every figure takes ~30 s on 2 cores


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    sweep = plant_sweep(uri)
    result = run_analysis(sweep.experiment, folder / "out", tracking_uri=uri)
    return uri, sweep, result


def test_artifacts_only_in_the_larger_size_from_40_percent_and_block_3(planted):
    _, _, result = planted
    table = pd.read_csv(result.out_dir / "emergence.csv", dtype=str)
    assert sorted(table["model_size"]) == ["micro", "micro", "mini", "mini"]
    micro = table[table["model_size"] == "micro"]
    assert set(micro["artifacts"]) == {"no"}
    assert set(micro["emergence_fraction"]) == {"none"}
    assert set(micro["emergence_block"]) == {"none"}
    mini = table[table["model_size"] == ARTIFACT_SIZE].set_index("steps")
    assert set(mini["artifacts"]) == {"yes"}
    assert mini.loc["100", "emergence_step"] == "40" and mini.loc["200", "emergence_step"] == "80"
    assert set(mini["emergence_fraction"]) == {"0.4"}
    assert set(mini["emergence_block"]) == {"3"}
    assert result.sizes_with_artifacts == [ARTIFACT_SIZE]


def test_report_states_the_emergence_in_its_table_and_sentences(planted):
    _, _, result = planted
    report = result.report_path.read_text()
    assert "| supervised | mini | 100 | 3 | yes | 40 | 0.4 | 3 |" in report
    assert "| supervised | mini | 200 | 3 | yes | 80 | 0.4 | 3 |" in report
    assert "| supervised | micro | 100 | 3 | no | none | none | none |" in report
    assert "appeared in: mini. No artifacts in: micro." in report


def test_four_registers_are_best_for_miou_and_recommended(planted):
    _, _, result = planted
    best = pd.read_csv(result.out_dir / "best_registers.csv")
    miou = best[best["metric"] == "miou"]
    assert len(miou) == 4  # 2 sizes x 2 lengths
    assert set(miou["best_num_registers"]) == {4}
    assert set(miou["clear"]) == {"yes"}
    rec = json.loads((result.out_dir / "summary.json").read_text())["recommendation"]
    assert rec["num_registers"] == 4
    assert rec["per_size"] == {"micro": 4, "mini": 4}
    assert rec["can_tell"] is True
    report = result.report_path.read_text()
    # The number comes with its rule and its evidence, right below it.
    recommended = report.index("**Recommended number of registers: 4**")
    after = report[recommended:].splitlines()
    assert after[1].startswith("  - Rule: the smallest register count whose dense mIoU is within the 95% interval")
    assert after[2].startswith("  - Evidence, micro (200 steps, 3 seeds): 4 registers give dense mIoU")
    assert "the best count, 4" in after[2] and "95% interval" in after[2]
    # Every setting learned: the learning table says so, beside chance.
    learning = pd.read_csv(result.out_dir / "learning.csv")
    assert len(learning) == 4 and set(learning["learned"]) == {"yes"}
    assert set(learning["chance"]) == {0.167}
    assert "mini, 200 steps: learned: val top-1" in report


def test_register_table_shows_outliers_gone_with_registers(planted):
    _, _, result = planted
    stats = result.stats
    mini = stats[(stats["model_size"] == "mini") & (stats["metric"] == "outlier_frac") & (stats["steps"] == 200)]
    by_count = mini.set_index("num_registers")["mean"]
    assert by_count[0] > 0.02
    assert (by_count.drop(index=0) < 0.005).all()
    assert set(mini["n"]) == {3}


def test_running_and_failed_trials_are_skipped_and_listed(planted):
    _, sweep, result = planted
    skipped = {s.run_id: s.status for s in result.sweep.skipped}
    assert skipped == {sweep.running_run_id: "RUNNING", sweep.failed_run_id: "FAILED"}
    report = result.report_path.read_text()
    assert sweep.running_run_id in report and sweep.failed_run_id in report
    assert len(result.sweep.trials) == len(sweep.trial_run_ids)


def test_figures_exist_and_report_links_resolve(planted):
    _, _, result = planted
    expected = {
        "emergence_progress", "emergence_depth_micro", "emergence_depth_mini", "register_effect",
        "norm_hist_output", "norm_distributions", "attention_maps",
    }
    assert expected <= set(result.figures)
    for path in result.figures.values():
        assert path.suffix == ".png" and path.stat().st_size > 10_000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", result.report_path.read_text())
    assert len(links) == len(result.figures)
    assert all((result.out_dir / link).is_file() for link in links)


def test_analysis_run_is_logged_in_the_experiment(planted):
    uri, sweep, result = planted
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([sweep.experiment_id], filter_string="tags.`sweep.role` = 'analysis'")
    assert [r.info.run_id for r in runs] == [result.analysis_run_id]
    run = runs[0]
    # Named for the launch it analysed and nested under that launch's parent run, beside its trials.
    assert run.info.run_name == "analysis launch"
    assert run.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
    assert run.data.metrics["recommended_num_registers"] == 4
    assert run.data.metrics["emergence/mini/steps_100/fraction"] == pytest.approx(0.4)
    assert run.data.params["threshold"] == "0.01"
    logged = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "emergence.csv", "summary.json", "figures"} <= logged


def test_client_fallback_reads_the_same_histories_as_sql(planted):
    uri, sweep, _ = planted
    via_sql = load_sweep(sweep.experiment, uri, use_sql=True)
    via_client = load_sweep(sweep.experiment, uri, use_sql=False)
    columns = ["run_id", "key", "step"]
    a = via_sql.history.sort_values(columns).reset_index(drop=True)
    b = via_client.history.sort_values(columns).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert {t.run_id for t in via_sql.trials} == {t.run_id for t in via_client.trials}
    assert not any(key.startswith("probe/outlier_frac_abs") for key in a["key"])


def test_parent_run_filter_and_unknown_parent(planted):
    uri, sweep, _ = planted
    assert len(load_sweep(sweep.experiment, uri, parent_run=sweep.parent_run_id).trials) == len(sweep.trial_run_ids)
    from orchestrator.analyze import AnalysisError

    with pytest.raises(AnalysisError, match="holds no trial runs under parent run nope"):
        load_sweep(sweep.experiment, uri, parent_run="nope")


def test_single_seed_sweep_says_it_cannot_tell(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    planted = plant_sweep(uri, "one-seed", lengths=(100,), seeds=(0,), probe_files=False, unfinished=False)
    result = run_analysis(planted.experiment, tmp_path / "out", tracking_uri=uri, log_to_mlflow=False)
    report = result.report_path.read_text()
    assert "one seed per setting" in report.lower()
    assert result.recommendation.can_tell is False
    # No number from single runs: what is missing, and the command that supplies it.
    assert result.recommendation.num_registers is None
    assert "**No recommendation.**" in report and "Recommended number of registers" not in report
    assert "--set 'seeds=[0,1,2]'" in report
    assert "(n=1)" in report  # intervals shown as undefined, not as zero width
    assert "No trial has probe artifacts" in report  # missing artifacts are reported, not a crash


def test_models_that_did_not_learn_get_no_recommendation(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    planted = plant_sweep(uri, "untrained", sizes=("micro",), registers=(0, 4), lengths=(100,), seeds=(0, 1, 2),
                          probe_files=False, unfinished=False, learned=False)
    result = run_analysis(planted.experiment, tmp_path / "out", tracking_uri=uri, log_to_mlflow=False)
    report = result.report_path.read_text()
    assert result.recommendation.num_registers is None
    assert "**No recommendation.**" in report and "Recommended number of registers" not in report
    assert "micro at 100 steps did not learn" in report
    assert "--set 'grid.steps=[400]'" in report
    assert "micro, 100 steps: did NOT learn: val top-1" in report
    assert list(pd.read_csv(tmp_path / "out" / "learning.csv")["learned"]) == ["NO"]
