"""The analysis CLI's one-line errors, its rules on small inputs, and robustness to missing data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.analyze.emergence import first_sustained_crossing
from orchestrator.analyze.registers import recommend, t_interval

REPO = Path(__file__).resolve().parents[1]


def analyze(*args: str, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.analyze", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    """One store for the error tests (creating an MLflow SQLite schema takes seconds):
    experiment 'half' holds only a trial that is still RUNNING."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("half")
    client.create_run(experiment_id, tags={"sweep.role": "trial", "axis.model_size": "micro"})  # stays RUNNING
    client.create_experiment("empty")
    failed = client.create_run(client.create_experiment("failed"), tags={"sweep.role": "trial", "failure_reason": "boom"})
    client.set_terminated(failed.info.run_id, "FAILED")
    return uri


def test_unknown_experiment_lists_existing_ones(small_store: str, tmp_path: Path):
    line = error_line(analyze("--experiment", "nope", "--out", "out", uri=small_store, cwd=tmp_path))
    assert "'nope'" in line and "half" in line and "Default" in line
    assert not (tmp_path / "out").exists()


def test_missing_store_file_names_the_path(tmp_path: Path):
    line = error_line(analyze("--experiment", "x", uri=f"sqlite:///{tmp_path / 'absent.db'}", cwd=tmp_path))
    assert "absent.db" in line
    assert not (tmp_path / "absent.db").exists()  # no empty store created as a side effect


def test_unreachable_server_names_the_uri(tmp_path: Path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    line = error_line(analyze("--experiment", "x", uri=uri, cwd=tmp_path))
    assert uri in line


def test_no_finished_trials(small_store: str, tmp_path: Path):
    line = error_line(analyze("--experiment", "half", uri=small_store, cwd=tmp_path))
    assert "no finished trials" in line and "RUNNING" in line


def test_empty_experiment(small_store: str, tmp_path: Path):
    line = error_line(analyze("--experiment", "empty", "--out", "out", uri=small_store, cwd=tmp_path))
    assert "'empty' holds no trial runs" in line
    assert not (tmp_path / "out").exists()


def test_only_failed_trials(small_store: str, tmp_path: Path):
    line = error_line(analyze("--experiment", "failed", "--out", "out", uri=small_store, cwd=tmp_path))
    assert "all 1 trial runs FAILED" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # plants a store and draws the figures in a subprocess
def test_trials_without_probe_metrics_or_artifacts_still_get_a_report(tmp_path: Path):
    from planted_store import plant_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plant_sweep(uri, "bare", sizes=("micro",), registers=(0, 4), lengths=(20,), seeds=(0, 1),
                probe_files=False, probe_metrics=False, unfinished=False)
    proc = analyze("--experiment", "bare", "--out", "out", "--no-log", uri=uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "no outlier-fraction metrics were logged" in report
    assert "No trial logged probe/seg_miou" in report
    assert "falls back to top1" in report
    assert "No trial has probe artifacts" in report


def test_first_sustained_crossing_requires_staying_above():
    assert first_sustained_crossing([0, 0, 0.03, 0.03], 0.01) == 2
    assert first_sustained_crossing([0, 0.03, 0, 0.03, 0.02], 0.01) == 3  # a blip before does not count
    assert first_sustained_crossing([0, 0.03, 0.03, 0], 0.01) is None  # fell back below
    assert first_sustained_crossing([], 0.01) is None


def test_t_interval_matches_the_textbook_and_is_undefined_for_one_seed():
    low, high = t_interval([1.0, 2.0, 3.0])
    assert (low + high) / 2 == pytest.approx(2.0)
    assert (high - low) / 2 == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert all(np.isnan(t_interval([1.0])))


def _stats(rows):
    return pd.DataFrame(rows, columns=["model_size", "steps", "metric", "num_registers", "n", "mean", "ci_low", "ci_high"])


def test_rule_picks_the_smallest_count_within_the_best_interval_and_without_outliers():
    rows = [
        ("base", 100, "miou", 0, 3, 0.60, 0.59, 0.61),  # within the best's interval, but has outliers
        ("base", 100, "miou", 2, 3, 0.599, 0.589, 0.609),  # within, clean: the answer
        ("base", 100, "miou", 4, 3, 0.605, 0.598, 0.612),  # best mean
        ("base", 100, "outlier_frac", 0, 3, 0.03, 0.02, 0.04),
        ("base", 100, "outlier_frac", 2, 3, 0.001, 0.0, 0.002),
        ("base", 100, "outlier_frac", 4, 3, 0.001, 0.0, 0.002),
    ]
    rec = recommend(_stats(rows), threshold=0.01)
    assert rec.num_registers == 2
    assert rec.can_tell is False  # 2 and 4 overlap: the report must say so
    assert any("cannot tell 4 registers apart from 0, 2" in s for s in rec.verdict)
