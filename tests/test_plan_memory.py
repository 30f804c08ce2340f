"""The plan's GPUs, wall-clock hours and memory per GPU, and its warnings for trials that will not fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec.memory import USABLE_SHARE, workers_for
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import load_spec, parse_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
BASE: dict[str, Any] = {
    "name": "memory_test",
    "train": {
        "model": {"size": "base", "img_size": 224},
        "data": {"name": "imagefolder", "root": "/nowhere"},
        "optim": {"batch_size": 256},
        "steps": 1000,
    },
    "grid": {"model.num_registers": [0, 4]},
    "resources": {"cpu": 8, "gpu": 1},
}


def plan_of(resources: dict[str, Any] | None = None, **train: Any) -> Any:
    raw = copy.deepcopy(BASE)
    raw["train"].update(train)
    if resources is not None:
        raw["resources"] = resources
    return make_plan(parse_spec(raw))


def table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.fixture()
def data_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGENET_ROOT", "/any/path")
    monkeypatch.setenv("SHARDS_ROOT", "/any/shards")


def test_each_trial_shows_its_gpus_wall_hours_and_memory(data_roots: None) -> None:
    plan = make_plan(load_spec(SWEEPS / "deit3_registers.yaml"))  # 8 workers of one GPU each
    text = format_plan(plan)
    header = next(line for line in text.splitlines() if line.startswith("#"))
    assert "GPUs" in header and "wall-h" in header and "mem GB" in header
    for trial, row in zip(plan.trials, table_rows(text)):
        assert trial.gpus == 8 and trial.wall_hours == pytest.approx(trial.gpu_hours / 8)
        assert row[-3] == "8" and row[-1] == f"{trial.memory.estimate.total / 1e9:.1f}"
        assert trial.memory.estimate.batch == 2048 // 8  # the per-worker share
    assert "per-worker batch 256" in text and "every trial fits" in text
    assert "hours wall clock = GPU-hours / GPUs per trial" in text


def test_a_trial_that_does_not_fit_is_named_with_its_fixes(data_roots: None) -> None:
    # The shipped DINOv2 spec checkpoints its blocks (8 workers of 128 images each) and fits;
    # without checkpointing ViT-B and ViT-L do not, which the plan must say before launch.
    shipped = format_plan(make_plan(load_spec(SWEEPS / "dinov2_registers.yaml")))
    assert "every trial fits" in shipped and "WARNING" not in shipped
    text = format_plan(make_plan(load_spec(SWEEPS / "dinov2_registers.yaml", ["train.grad_checkpointing=false"])))
    assert "(H100: 80 GB, of which a process may use 72.0 GB" in text and "12 of 18 trials do not fit" in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2
    large = next(line for line in warnings if "model.size=large" in line)
    assert large.startswith("WARNING: trials 12-17 (model.size=large, model.num_registers=0/1/2/4/8/16) need")
    assert "will not fit H100's 72.0 GB" in large and "Fix: train.grad_checkpointing: true" in large
    assert "resources.workers: 32 (gpu_per_worker: 1) keeps the global batch of 1024" in large
    rows = table_rows(text)
    assert all(row[-1] == "!" for row in rows[6:]) and all(row[-1] != "!" for row in rows[:6])


def test_the_clip_spec_fits_only_with_its_checkpointing(data_roots: None) -> None:
    plan = make_plan(load_spec(SWEEPS / "clip_registers.yaml"))  # 8 workers of 512 pairs, checkpointed
    assert all(t.memory.fits for t in plan.trials)
    unchecked = make_plan(load_spec(SWEEPS / "clip_registers.yaml", ["train.grad_checkpointing=false"]))
    large = [t for t in unchecked.trials if t.config.model.size == "large"]
    assert all(not t.memory.fits for t in large) and all(t.memory.fits for t in unchecked.trials if t not in large)
    assert all(t.memory.fix is not None and t.memory.fix.checkpointing_fits for t in large)


def test_a_fractional_gpu_gives_its_share_of_the_memory() -> None:
    plan = plan_of({"cpu": 2, "gpu": 0.25})
    budget = plan.trials[0].memory.budget_bytes
    assert budget == pytest.approx(USABLE_SHARE * 80e9 * 0.25)
    assert "80 GB (0.25 of it)" in format_plan(plan)


def test_gpu_memory_comes_from_the_table_or_the_spec() -> None:
    raw = copy.deepcopy(BASE)
    raw["cost"] = {"gpu_type": "T4", "peak_tflops": 65, "usd_per_gpu_hour": 0.5}
    text = format_plan(make_plan(parse_spec(raw)))
    assert "T4's memory is not in the table: set cost.gpu_memory_gb" in text
    raw["cost"]["gpu_memory_gb"] = 16
    plan = make_plan(parse_spec(raw))
    assert plan.trials[0].memory.budget_bytes == pytest.approx(USABLE_SHARE * 16e9)
    assert "T4: 16 GB" in format_plan(plan)


def test_when_not_even_one_image_fits_the_fix_is_a_bigger_gpu() -> None:
    raw = copy.deepcopy(BASE)
    raw["train"]["model"]["size"] = "giant"
    raw["cost"] = {"gpu_type": "L4", "gpu_memory_gb": 12}  # ViT-g: 1.1B weights, 18 GB with gradients and AdamW
    text = format_plan(make_plan(parse_spec(raw)))
    assert "a GPU with more memory (cost.gpu_type)" in text


def test_cpu_trials_show_host_memory_and_no_warning() -> None:
    text = format_plan(plan_of({"cpu": 2}))
    assert "this is host memory" in text and "WARNING" not in text
    assert all(row[-2] == "-" for row in table_rows(text))  # no GPU: no wall clock from GPU-hours


def test_the_suggested_workers_split_the_batch_evenly() -> None:
    assert workers_for(256, 60) == 8 and workers_for(256, 128) == 2 and workers_for(2048, 300) == 8
    assert workers_for(96, 40) == 3
