"""The memory estimate (trainers/memory.py) against what the CPU measures, for every objective.

Saved bytes: one training forward pass of the real objective (as the Trainer builds it) inside
saved_tensors_hooks, at two model sizes and batches, bf16 autocast and fp32, grad checkpointing
off and on. Peak: the bytes alive at once through a whole training step. The printed table
is `python -m orchestrator.bench memory`.
"""

from __future__ import annotations

import pytest

from orchestrator.bench.memory import PEAK_BOUND, TOLERANCE, calibration_cases, measure, measure_peak
from trainers.config import TrainConfig
from trainers.memory import estimate_memory, largest_fitting_batch, trained_and_frozen_params

CASES = calibration_cases()
IDS = [name.replace(" ", "-") for name, _ in CASES]


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("name, base", CASES, ids=IDS)
def test_saved_activations_match_the_estimate(name: str, base: TrainConfig, checkpointing: bool, bf16: bool) -> None:
    cfg = base.model_copy(update={"grad_checkpointing": checkpointing})
    got = measure(cfg, bf16)
    estimate = estimate_memory(cfg, cfg.data.num_classes, bf16=bf16)
    assert estimate.activations == pytest.approx(got.saved_bytes, rel=TOLERANCE), name
    assert trained_and_frozen_params(cfg, cfg.data.num_classes) == (got.trained_params, got.frozen_params)


PEAK_CASES = [(name, cfg) for name, cfg in CASES if name.endswith("micro") and "recipe" not in name]


@pytest.mark.slow  # every op of two training steps goes through a Python dispatch mode: 10-40 s each on 2 busy cores
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("name, base", PEAK_CASES, ids=[name.replace(" ", "-") for name, _ in PEAK_CASES])
def test_the_estimated_total_bounds_a_training_steps_peak(name: str, base: TrainConfig, checkpointing: bool) -> None:
    # bf16 only (what a GPU runs), the smaller size (`bench memory` prints both); the recipe's
    # supervised case adds nothing here that the plain one does not show.
    cfg = base.model_copy(update={"grad_checkpointing": checkpointing})
    peak = measure_peak(cfg, bf16=True)
    total = estimate_memory(cfg, cfg.data.num_classes, bf16=True).total
    low, high = PEAK_BOUND
    assert low * peak <= total <= high * peak, f"{name}: estimate {total} against a measured peak of {peak}"


def test_checkpointing_keeps_only_block_inputs_for_every_objective() -> None:
    for name, base in CASES:
        full = estimate_memory(base, base.data.num_classes).activations
        checkpointed = estimate_memory(base.model_copy(update={"grad_checkpointing": True}), base.data.num_classes)
        assert checkpointed.activations < full / 2, name


def test_the_issues_figures_at_the_shipped_sizes() -> None:
    """Issue 22's hand estimates: DINOv2 at batch 256 (914 student tokens per image) about 100 GB
    for ViT-B and 230 GB for ViT-L; CLIP ViT-L at batch 512 about 92 GB, all without checkpointing."""
    dino = TrainConfig.model_validate({
        "objective": "dino", "model": {"size": "base", "patch_size": 14, "img_size": 224},
        "dino": {"local_crops": 8, "local_crop_size": 98}, "optim": {"batch_size": 256},
    })
    assert 2 * 257 + 8 * 50 == 914
    base = estimate_memory(dino, 0).activations / 1e9
    large = estimate_memory(dino.model_copy(update={"model": dino.model.model_copy(update={"size": "large"})}), 0)
    assert 85 < base < 115 and 200 < large.activations / 1e9 < 260
    clip = TrainConfig.model_validate({
        "objective": "clip", "model": {"size": "large", "patch_size": 16, "img_size": 224},
        "optim": {"batch_size": 512},
    })
    assert 85 < estimate_memory(clip, 0).activations / 1e9 < 110


def test_a_worker_holds_its_share_and_the_largest_batch_fits() -> None:
    cfg = TrainConfig.model_validate({"model": {"size": "base"}, "optim": {"batch_size": 1024}})
    one, eight = estimate_memory(cfg, 1000), estimate_memory(cfg, 1000, workers=8)
    assert (one.batch, eight.batch) == (1024, 128)
    assert eight.activations == estimate_memory(cfg, 1000, batch=128).activations < one.activations / 7
    assert eight.grads == 2 * one.grads  # DDP's buckets beside the gradients
    budget = 20e9
    most = largest_fitting_batch(cfg, 1000, budget)
    assert estimate_memory(cfg, 1000, batch=most).total <= budget < estimate_memory(cfg, 1000, batch=most + 1).total
