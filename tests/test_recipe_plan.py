"""Time, money and the learning rate before launch: the plan's GPU-hours, cost and lr lines,
the spec's cost block and --set, and the DeiT-III sweep's dry run."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec.errors import SpecError
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import load_spec, parse_spec
from trainers.cost import GPU_PEAK_TFLOPS, GPU_USD_PER_HOUR, MEASURED_IMAGES_PER_S

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
BASE: dict[str, Any] = {
    "name": "cost_test",
    "train": {
        "model": {"size": "small", "img_size": 224},
        "data": {"name": "imagefolder", "root": "/nowhere"},
        "optim": {"lr": 4e-3, "lr_ref_batch": 2048, "batch_size": 1024},
        "steps": 1000,
    },
    "grid": {"model.num_registers": [0, 4]},
    "resources": {"cpu": 8, "gpu": 4},
}


def spec_with(**cost: Any) -> Any:
    raw = copy.deepcopy(BASE)
    if cost:
        raw["cost"] = cost
    return parse_spec(raw)


def test_gpu_hours_and_cost_follow_flops_at_the_stated_mfu() -> None:
    plan = make_plan(spec_with())  # defaults: H100, 40% MFU, the table's price
    for trial in plan.trials:
        hours = trial.flops / (989e12 * 0.4) / 3600
        assert trial.gpu_hours == pytest.approx(hours)
        assert trial.usd == pytest.approx(hours * GPU_USD_PER_HOUR["H100"])
    assert plan.total_gpu_hours == pytest.approx(sum(t.gpu_hours for t in plan.trials))
    text = format_plan(plan)
    assert "estimate on H100, FLOPs at 40% MFU of 989 TFLOP/s; $4 per GPU-hour" in text
    assert re.search(r"GPU-hours per trial; [\d.]+ GPU-hours, \$[\d.]+ for the sweep", text)
    assert "a trial on its 4 GPUs" in text
    header = next(line for line in text.splitlines() if line.startswith("#"))
    assert "GPU-h" in header and "USD" in header


def test_the_spec_overrides_gpu_price_and_mfu() -> None:
    default = make_plan(spec_with())
    a100 = make_plan(spec_with(gpu_type="A100", usd_per_gpu_hour=1.5, mfu=0.3))
    ratio = (GPU_PEAK_TFLOPS["H100"] * 0.4) / (GPU_PEAK_TFLOPS["A100"] * 0.3)
    assert a100.total_gpu_hours == pytest.approx(default.total_gpu_hours * ratio)
    assert a100.total_usd == pytest.approx(a100.total_gpu_hours * 1.5)
    cpu_only = copy.deepcopy(BASE)
    cpu_only["resources"] = {"cpu": 1, "gpu": 0}
    assert "the trials ask for no GPU" in format_plan(make_plan(parse_spec(cpu_only)))
    custom = make_plan(spec_with(gpu_type="B200", peak_tflops=2250, usd_per_gpu_hour=6))
    assert "estimate on B200" in format_plan(custom)


def test_an_unknown_gpu_without_its_peak_and_price_is_refused() -> None:
    with pytest.raises(SpecError, match="cost.*not in the table"):
        spec_with(gpu_type="B200")
    with pytest.raises(SpecError, match="cost.mfu"):
        spec_with(mfu=1.5)


def test_a_measured_throughput_wins_over_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MEASURED_IMAGES_PER_S, ("H100", "small", 224, 0, "supervised"), 5000.0)
    plan = make_plan(spec_with())
    measured = next(t for t in plan.trials if t.config.model.num_registers == 0)
    assert measured.gpu_hours == pytest.approx(1000 * 1024 / 5000 / 3600)
    assert "measured 5000 images/s" in format_plan(plan)


def test_the_plan_states_the_lr_scaling() -> None:
    text = format_plan(make_plan(spec_with()))
    assert "Learning rate: 0.004 given at reference batch 2048, scaled linearly to global batch 1024:" in text
    assert "0.004 * 1024 / 2048 = 0.002 (adamw)" in text


def test_set_changes_the_totals_and_the_lr(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(yaml.safe_dump(BASE))
    base = make_plan(load_spec(path))
    longer = make_plan(load_spec(path, ["train.steps=2000", "cost.gpu_type=L4", "train.optim.batch_size=512"]))
    assert longer.total_gpu_hours == pytest.approx(base.total_gpu_hours * 2 * 0.5 * 989 / 121)
    priced = make_plan(load_spec(path, ["cost.usd_per_gpu_hour=10"]))
    assert priced.total_usd == pytest.approx(base.total_gpu_hours * 10)
    text = format_plan(longer)
    assert "estimate on L4" in text and "= 0.001 (adamw)" in text


def test_deit3_registers_dry_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.sweep import main

    monkeypatch.setenv("IMAGENET_ROOT", "/any/path")
    assert main([str(SWEEPS / "deit3_registers.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 trials = 6 grid cells x 1 seed" in out
    assert "= 0.004 (lamb)" in out and "GPU-hours" in out and "for the sweep" in out
    plan = make_plan(load_spec(SWEEPS / "deit3_registers.yaml"))
    cfg = plan.trials[0].config
    assert cfg.steps == 250228 and cfg.optim.batch_size == 2048 and cfg.data.name == "imagefolder"
    assert cfg.augment.three_augment and cfg.augment.loss == "bce" and cfg.augment.mixup == 0.8
    assert cfg.model.layer_scale == 1e-4 and cfg.model.drop_path_mode == "uniform"
    assert [t.config.model.num_registers for t in plan.trials] == [0, 1, 2, 4, 8, 16]
    large = make_plan(load_spec(SWEEPS / "deit3_registers.yaml", [
        "train.model.size=large", "train.model.drop_path_rate=0.45", "train.optim.lr=3e-3",
    ]))
    assert large.total_gpu_hours > 10 * plan.total_gpu_hours
    assert "= 0.003 (lamb)" in format_plan(large)
