"""The analysis groups by objective: a planted sweep with two objectives whose answers differ."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.analyze import run_analysis
from planted_store import plant_sweep

pytestmark = pytest.mark.slow  # planting 32 runs into SQLite and drawing the figures: ~20 s on 2 cores


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_objectives")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # Supervised: artifacts in mini only; DINO: in micro and mini (the paper's strongest family).
    sweep = plant_sweep(
        uri, "families", registers=(0, 4), lengths=(100,), seeds=(0, 1), probe_files=False, unfinished=False,
        objectives=("supervised", "dino"), artifacts={"supervised": ("mini",), "dino": ("micro", "mini")},
    )
    return run_analysis(sweep.experiment, folder / "out", tracking_uri=uri, log_to_mlflow=False)


def test_emergence_is_mapped_per_objective(result) -> None:
    table = pd.read_csv(result.out_dir / "emergence.csv", dtype=str)
    assert list(table.columns[:2]) == ["objective", "model_size"]
    found = {(r.objective, r.model_size): r.artifacts for r in table.itertuples()}
    assert found == {
        ("supervised", "micro"): "no", ("supervised", "mini"): "yes", ("dino", "micro"): "yes", ("dino", "mini"): "yes",
    }
    assert result.sizes_with_artifacts == ["supervised/mini", "dino/micro", "dino/mini"]


def test_register_effect_and_recommendation_per_objective(result) -> None:
    assert set(result.stats["objective"]) == {"supervised", "dino"}
    best = pd.read_csv(result.out_dir / "best_registers.csv")
    assert list(best.columns[:2]) == ["objective", "model_size"]
    miou = best[best["metric"] == "miou"]
    assert sorted(zip(miou["objective"], miou["model_size"])) == [
        ("dino", "micro"), ("dino", "mini"), ("supervised", "micro"), ("supervised", "mini"),
    ]
    rec = json.loads((result.out_dir / "summary.json").read_text())["recommendation"]
    assert rec["num_registers"] == 4
    assert rec["per_objective"] == {"supervised": 4, "dino": 4}
    assert set(rec["per_size"]) == {"supervised/micro", "supervised/mini", "dino/micro", "dino/mini"}


def test_every_report_table_has_an_objective_column(result) -> None:
    report = result.report_path.read_text()
    headers = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    header_rows = [h for h in headers if "registers" in h.split("|")[2] or "model_size" in h]
    assert header_rows and all(h.startswith("| objective |") for h in header_rows)
    assert "| dino | micro | 100 | 2 | yes | 40 | 0.4 | 3 |" in report
    assert "### dino, mini, 100 training steps" in report and "### supervised, micro, 100 training steps" in report
    assert "Objectives: supervised and dino" in report
    assert (result.out_dir / "figures" / "emergence_depth_dino-micro.png").exists()
