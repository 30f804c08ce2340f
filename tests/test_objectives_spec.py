"""The objective axis in the sweep spec, the plan's FLOPs and the trial's MLflow tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec.errors import SpecError
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import load_spec, parse_spec
from orchestrator.trials.trainable import axis_tags, trial_config, trial_label
from trainers.cost import dino_head_macs, forward_macs_per_image, text_forward_macs

ROOT = Path(__file__).resolve().parents[1]


def test_families_crosses_three_objectives_with_registers() -> None:
    spec = load_spec(ROOT / "sweeps" / "families.yaml")
    plan = make_plan(spec)
    assert {(t.config.objective, t.config.model.num_registers) for t in plan.trials} == {
        (o, r) for o in ("supervised", "dino", "clip") for r in (0, 4)
    }
    text = format_plan(plan)
    assert "extra passes counted" in text and "teacher" in text and "text towers" in text


def test_flops_count_the_teacher_the_crops_and_the_text_tower() -> None:
    spec = load_spec(ROOT / "sweeps" / "families.yaml", ["grid.model.num_registers=[4]"])
    by_objective = {t.config.objective: t for t in make_plan(spec).trials}
    sup, dino, clip = (by_objective[o] for o in ("supervised", "dino", "clip"))
    cfg = dino.config
    scale = cfg.optim.batch_size * cfg.steps
    backbone = forward_macs_per_image(cfg.model, 0)
    local = forward_macs_per_image(cfg.model.model_copy(update={"img_size": cfg.dino.local_crop_size}), 0)
    head = dino_head_macs(cfg.model.dims[0], cfg.dino)
    masked = cfg.dino.ibot_mask_probability * sum(cfg.dino.ibot_mask_ratio) / 2 * cfg.model.num_patches
    global_crop = backbone + head * (1 + masked)
    student = 2 * global_crop + cfg.dino.local_crops * (local + head)
    assert dino.flops == int(6 * student + 2 * 2 * global_crop) * scale
    text = text_forward_macs(clip.config.clip)
    assert clip.flops == 6 * (backbone + cfg.model.dims[0] * clip.config.clip.embed_dim + text) * scale
    assert dino.flops > 2 * sup.flops and clip.flops > sup.flops


def test_a_bad_objective_or_a_clash_with_the_data_names_the_key() -> None:
    with pytest.raises(SpecError, match="objective"):
        parse_spec({"name": "x", "grid": {"objective": ["supervised", "mae"]}})
    with pytest.raises(SpecError, match="needs captions"):
        parse_spec({"name": "x", "train": {"data": {"name": "cifar10", "root": "/d"}}, "grid": {"objective": ["clip"]}})


def test_every_trial_run_is_tagged_with_its_objective() -> None:
    base = {"objective": "dino", "model": {"size": "micro", "img_size": 32, "patch_size": 4}, "dino": {"local_crop_size": 16}}
    cfg = trial_config(base, {"model.num_registers": 4})
    assert axis_tags(cfg, {"model.num_registers": 4})["axis.objective"] == "dino"
    assert axis_tags(trial_config({}, {}), {})["axis.objective"] == "supervised"
    assert trial_label({"objective": "clip", "model.num_registers": 4}, 3) == "t003-clip-r4"
