"""The sweep plan (grid x seeds x samples), its cost estimate, and the --dry-run text."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec.plan import format_flops, format_plan, make_plan, num_classes, tokens_per_image
from orchestrator.spec.schema import load_spec, parse_spec
from trainers.config import DataConfig
from trainers.cost import train_flops_per_image

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

BASE: dict[str, Any] = {
    "name": "plan_test",
    "train": {
        "model": {"size": "micro", "patch_size": 4, "img_size": 32},
        "data": {"name": "shapes", "num_classes": 6},
        "optim": {"batch_size": 16},
        "steps": 100,
        "eval_every": 10,
    },
    "seeds": [0, 1],
    "grid": {"model.num_registers": [0, 4], "model.size": ["micro", "mini"]},
    "resources": {"cpu": 2, "gpu": 0.5},
    "max_concurrent": 3,
}


def test_grid_times_seeds_with_exact_flops() -> None:
    plan = make_plan(parse_spec(BASE))
    assert len(plan.trials) == 2 * 2 * 2
    assert [t.index for t in plan.trials] == list(range(8))
    first, last = plan.trials[0], plan.trials[-1]
    assert first.axes == {"model.num_registers": 0, "model.size": "micro", "seed": 0}
    assert last.axes == {"model.num_registers": 4, "model.size": "mini", "seed": 1}
    assert (last.config.model.num_registers, last.config.model.size, last.config.seed) == (4, "mini", 1)
    for trial in plan.trials:
        expected = train_flops_per_image(trial.config.model, 6) * 16 * 100
        assert trial.flops == expected
    assert plan.total_flops == sum(t.flops for t in plan.trials)
    # registers lengthen the sequence, so they cost more (same size and seed)
    by_axes = {(t.axes["model.size"], t.axes["model.num_registers"], t.axes["seed"]): t.flops for t in plan.trials}
    assert by_axes[("micro", 4, 0)] > by_axes[("micro", 0, 0)]
    assert (plan.cpu_per_trial, plan.gpu_per_trial, plan.total_cpu, plan.total_gpu) == (2, 0.5, 16, 4)
    assert plan.concurrent_trials == 3


def test_search_multiplies_cells_by_samples() -> None:
    raw = copy.deepcopy(BASE)
    raw["search"] = {
        "num_samples": 3, "metric": "val/top1", "mode": "max",
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    }
    plan = make_plan(parse_spec(raw))
    assert len(plan.trials) == 8 * 3
    assert list(plan.searched) == ["optim.lr"]
    assert all("optim.lr" not in t.axes for t in plan.trials)
    text = format_plan(plan)
    assert "24 trials = 4 grid cells x 2 seeds x 3 samples" in text
    assert "loguniform[0.0001, 0.01]" in text and "3/3" in text


def test_num_classes_per_dataset() -> None:
    assert num_classes(DataConfig(name="shapes", num_classes=9)) == 9
    assert num_classes(DataConfig(name="cifar10")) == 10
    assert num_classes(DataConfig(name="cifar100")) == 100
    assert num_classes(DataConfig(name="imagefolder", root="/x")) == 1000
    assert num_classes(DataConfig(name="imagefolder", root="/x", num_classes=200)) == 200


@pytest.mark.parametrize(
    "flops, text",
    [(5e5, "500000 FLOP"), (3e9, "3 GFLOP"), (1.5e12, "1.5 TFLOP"), (2.25e15, "2.25 PFLOP"), (4e19, "40 EFLOP")],
)
def test_human_flops(flops: float, text: str) -> None:
    assert format_flops(flops) == text


def test_dry_run_text_lists_every_trial_and_the_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plan = make_plan(load_spec(SWEEPS / "quickstart.yaml"))
    text = format_plan(plan)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    for column in ("model.num_registers", "model.size", "steps", "seed", "tokens", "train FLOPs"):
        assert column in header
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == len(plan.trials) == 24
    assert rows[-1].split()[:4] == ["23", "16", "mini", "300"]
    assert rows[-1].split()[5] == str(16 + 1 + 16)  # tokens: 16 patches (8x8 px) + [CLS] + registers
    assert "24 trials = 24 grid cells x 1 seed" in text
    assert "1 CPU, 0 GPU per trial; all 24 at once: 24 CPU, 0 GPU" in text
    assert "at most 2 trials at once: 2 CPU, 0 GPU" in text
    assert f"{format_flops(plan.total_flops)} for the sweep" in text
    assert "MLflow experiment 'quickstart' at sqlite:///mlflow.db" in text
    assert str(Path("ray_results").resolve()) in text


def test_dry_run_of_the_gpu_study(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    plan = make_plan(load_spec(SWEEPS / "num_registers.yaml"))
    assert len(plan.trials) == 3 * 2 * 6 and plan.total_gpu == 36
    assert {tokens_per_image(t.config.model) for t in plan.trials} == {197 + r for r in (0, 1, 2, 4, 8, 16)}
    text = format_plan(plan)
    assert "at http://mlflow.internal:5000" in text and "EFLOP for the sweep" in text
    assert "as many trials as the cluster" in text


def test_search_and_scheduler_example_plan() -> None:
    text = format_plan(make_plan(load_spec(SWEEPS / "search_lr.yaml")))
    assert "Search: Optuna TPE" in text and "Scheduler: ASHA on val/loss (min)" in text

