"""The DeiT-III recipe (train.augment, model.layer_scale, drop_path_mode, optim lamb/lr_ref_batch)
against timm's own pieces, and the loop with the recipe on: it trains, resumes exactly, and
its checkpoints load with weights_only=True."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lamb

from trainers.augment import BatchAugment, ColourDraws, colour_augment, step_generator
from trainers.config import AugmentConfig, ModelConfig, OptimConfig, TrainConfig
from trainers.data.sampling import derive_seed
from trainers.loop import CHECKPOINT_FILE, Trainer
from trainers.model import build_model, drop_path_rates
from trainers.probes import names
from trainers.tracking import MemoryTracker

CPU = torch.device("cpu")
RECIPE = dict(three_augment=True, repeats=3, mixup=0.8, cutmix=1.0, loss="bce")


def recipe_config(**overrides) -> TrainConfig:
    raw = dict(
        model=dict(size="micro", img_size=32, patch_size=8, num_registers=2, layer_scale=1e-4,
                   drop_path_rate=0.1, drop_path_mode="uniform"),
        data=dict(name="shapes", num_classes=4, train_size=128, val_size=32),
        optim=dict(name="lamb", lr=4e-3, lr_ref_batch=2048, batch_size=16, warmup_steps=1),
        augment=RECIPE,
        # Probes on as deit3_registers.yaml runs them (about every tenth of the run, and at the end).
        probe=dict(every=2, batch_size=16),
        steps=4, log_every=2, eval_every=2, seed=5,
    )
    raw.update(overrides)
    return TrainConfig.model_validate(raw)


# ------------------------------------------------------------------ defaults and validation


def test_recipe_is_off_by_default() -> None:
    cfg = TrainConfig()
    assert not cfg.augment.active and cfg.model.layer_scale is None and cfg.model.drop_path_mode == "linear"
    assert cfg.optim.name == "adamw" and cfg.optim.scaled_lr == cfg.optim.lr
    assert build_model(cfg.model.model_copy(update={"size": "micro", "img_size": 32, "patch_size": 8}), 4).blocks[0].ls1.__class__.__name__ == "Identity"


@pytest.mark.parametrize(
    "augment, message",
    [
        (dict(repeats=2), "needs three_augment"),
        (dict(loss="bce", label_smoothing=0.1, bce_target_threshold=0.0), "binarises every target"),
    ],
)
def test_contradictory_recipe_keys_are_refused(augment, message) -> None:
    with pytest.raises(ValidationError, match=message):
        AugmentConfig(**augment)


def test_recipe_is_for_the_supervised_objective_and_mixup_needs_an_even_batch() -> None:
    with pytest.raises(ValidationError, match="objective supervised"):
        TrainConfig.model_validate({"objective": "dino", "augment": {"mixup": 0.8}})
    with pytest.raises(ValidationError, match="must be even"):
        TrainConfig.model_validate({"optim": {"batch_size": 15}, "augment": {"cutmix": 1.0}})


def test_lr_is_scaled_linearly_from_the_reference_batch() -> None:
    assert OptimConfig(lr=4e-3, lr_ref_batch=2048, batch_size=512).scaled_lr == pytest.approx(1e-3)
    assert OptimConfig(lr=4e-3, batch_size=512).scaled_lr == 4e-3
    trainer = Trainer(recipe_config(), CPU)
    assert trainer.scheduler.base_lrs[0] == pytest.approx(4e-3 * 16 / 2048)


# ------------------------------------------------------------------ model and optimizer


def test_layer_scale_present_with_its_init_value() -> None:
    model = build_model(ModelConfig(size="micro", img_size=32, patch_size=8, layer_scale=1e-4), 4)
    for block in model.blocks:
        assert torch.equal(block.ls1.gamma.detach(), torch.full((64,), 1e-4))
        assert torch.equal(block.ls2.gamma.detach(), torch.full((64,), 1e-4))


def test_drop_path_linear_as_timm_uniform_as_deit3() -> None:
    linear = build_model(ModelConfig(size="micro", img_size=32, patch_size=8, drop_path_rate=0.3), 4)
    assert drop_path_rates(linear) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    uniform = build_model(
        ModelConfig(size="micro", img_size=32, patch_size=8, drop_path_rate=0.3, drop_path_mode="uniform"), 4
    )
    assert drop_path_rates(uniform) == pytest.approx([0.3] * 4)
    assert all(isinstance(b.drop_path2, DropPath) and b.drop_path2.drop_prob == 0.3 for b in uniform.blocks)


def test_lamb_is_chosen_with_the_decay_groups() -> None:
    trainer = Trainer(recipe_config(), CPU)
    assert isinstance(trainer.optimizer, Lamb)
    decays = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert decays == [0.0, 0.05]
    assert isinstance(Trainer(recipe_config(optim=dict(batch_size=16)), CPU).optimizer, torch.optim.AdamW)


# ------------------------------------------------------------------ mixing and the loss


def test_mixup_targets_match_timm_mixup_for_the_steps_seed() -> None:
    trainer = Trainer(recipe_config(augment=dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1)), CPU)
    batch = next(trainer.data.train_batches(7, 16))
    original = batch.images.clone()  # timm's Mixup mixes in place
    images, targets = trainer.objective.inputs(batch, 7)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    np.random.seed(derive_seed(5, "mixup", 7) % 2**32)
    ref_images, ref_targets = reference(original, batch.labels.clone())
    assert torch.equal(targets, ref_targets) and torch.equal(images, ref_images)
    assert targets.shape == (16, 4) and torch.allclose(targets.sum(1), torch.ones(16))
    # numpy's global stream is untouched by the seeded call
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    trainer.objective.inputs(batch, 8)
    assert np.array_equal(np.random.get_state()[1], before)


def test_bce_binarises_the_mixed_targets_as_timm_does() -> None:
    trainer = Trainer(recipe_config(augment=dict(mixup=0.8, cutmix=1.0, loss="bce")), CPU)
    criterion = trainer.objective.criterion
    assert isinstance(criterion, BinaryCrossEntropy) and criterion.target_threshold == 0.0
    logits = torch.randn(4, 3)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.2, 0.8]])
    binary = (soft > 0).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, binary)
    assert torch.allclose(criterion(logits, soft), expected)
    assert isinstance(Trainer(recipe_config(augment=dict(mixup=0.8)), CPU).objective.criterion, SoftTargetCrossEntropy)


def test_label_smoothing_without_mixing_is_timms_smoothed_cross_entropy() -> None:
    trainer = Trainer(recipe_config(augment=dict(label_smoothing=0.1)), CPU)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(trainer.objective.criterion(logits, labels), expected)


# ------------------------------------------------------------------ 3-Augment


def test_three_augment_colour_operations_draw_per_image() -> None:
    images = torch.rand(12, 3, 40, 48)
    out = colour_augment(images, ColourDraws.draw(12, 0.3, step_generator(1, 2, "three_augment")))
    assert out.shape == (12, 3, 40, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    same = images[:1].expand(12, -1, -1, -1).contiguous()
    copies = colour_augment(same, ColourDraws.draw(12, 0.3, step_generator(1, 2, "three_augment")))
    assert len({round(float(c.sum()), 3) for c in copies}) == 12  # each copy its own choice and jitter


def test_three_augment_is_a_pure_function_of_seed_and_step_and_ranks_apply_their_rows() -> None:
    images = torch.randn(16, 3, 32, 32)
    aug = BatchAugment(seed=4, mean=torch.zeros(3), std=torch.ones(3), jitter=0.3, global_batch=16)
    first = aug(images, step=9)
    torch.rand(5)  # the global stream moves; the batch does not
    assert torch.equal(first, aug(images, step=9)) and not torch.equal(first, aug(images, step=10))
    # Two ranks, each with its half of the global batch: the rows one process makes.
    halves = [aug(images[8 * r : 8 * (r + 1)], step=9, share=(r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), first)
    with pytest.raises(ValueError, match="1/2 of the global batch 16"):
        aug(images[:4], step=9, share=(0, 2))


def test_three_augment_under_bf16_autocast_is_the_fp32_result() -> None:
    """Under bf16 autocast (as on a GPU with precision auto) the blur once wrote bf16 into the fp32
    batch and failed; augmentation now runs in fp32 with autocast off: the same numbers exactly."""
    images = torch.randn(16, 3, 32, 32)
    aug = BatchAugment(seed=4, mean=torch.full((3,), 0.4), std=torch.full((3,), 0.2), jitter=0.3, global_batch=16)
    plain = aug(images, step=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = aug(images, step=3)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    assert int(ColourDraws.draw(16, 0.3, step_generator(4, 3, "three_augment")).choice.eq(2).sum()) > 0  # blur ran


def test_the_recipe_trains_a_step_under_bf16() -> None:
    trainer = Trainer(recipe_config(precision="bf16", steps=2, eval_every=2, log_every=1), CPU)
    metrics = trainer.fit()
    assert np.isfinite(metrics[names.VAL_LOSS])


# ------------------------------------------------------------------ the loop with the recipe on


def test_a_few_steps_with_the_whole_recipe_train_evaluate_and_probe() -> None:
    # Four steps at the lr scaled down from batch 2048 do not learn; what is checked is that the
    # whole recipe updates every trained tensor, and that evaluation and probes see the result.
    tracker = MemoryTracker()
    trainer = Trainer(recipe_config(), CPU)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = trainer.fit(tracker)
    losses = tracker.history(names.TRAIN_LOSS)
    assert trainer.step == 4 and len(losses) == 2 and all(np.isfinite(v) for _, v in losses)
    unchanged = [name for name, p in trainer.model.named_parameters() if torch.equal(before[name], p)]
    assert unchanged == [], unchanged  # LayerScale gammas, registers and the head included
    assert metrics == trainer.evaluate()  # the returned metrics are the final weights' evaluation
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [2, 4]
    assert f"{names.artifact_dir(4)}/{names.ATTENTION_FIGURE}" in tracker.files


def test_checkpoint_round_trip_is_exact_and_weights_only(tmp_path) -> None:
    cfg = recipe_config()
    original = Trainer(cfg, CPU)
    per_step = cfg.optim.batch_size  # output positions; the loader repeats the images
    batches = original.data.train_batches(0, per_step)
    for _ in range(3):
        original.train_step(next(batches))
        original.step += 1
    original.save(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 3
    expected = original.train_step(next(batches))

    restored = Trainer(cfg, CPU)
    restored.load(tmp_path)
    resumed = restored.train_step(next(restored.data.train_batches(restored.step, per_step)))
    assert torch.equal(resumed, expected)


def test_resumed_fit_with_the_recipe_matches_an_uninterrupted_fit(tmp_path) -> None:
    cfg = recipe_config(steps=4, eval_every=2, log_every=2)
    straight = MemoryTracker()
    Trainer(cfg, CPU).fit(straight)

    class Stop(Exception):
        pass

    first, first_log = Trainer(cfg, CPU), MemoryTracker()

    def stop(step: int, metrics: dict) -> None:
        first.save(tmp_path)
        raise Stop

    with pytest.raises(Stop):
        first.fit(first_log, stop)
    second, second_log = Trainer(cfg, CPU), MemoryTracker()
    second.load(tmp_path)
    second.fit(second_log)
    for key in (names.TRAIN_LOSS, names.VAL_LOSS, names.outlier_frac(names.OUTPUT)):
        assert first_log.history(key) + second_log.history(key) == straight.history(key), key


def test_the_recipe_trains_on_an_imagefolder_with_imagenet_statistics(tmp_path) -> None:
    from test_data import write_image_tree

    write_image_tree(tmp_path)
    cfg = recipe_config(
        data=dict(name="imagefolder", root=str(tmp_path), num_workers=0),
        optim=dict(name="lamb", lr=4e-3, lr_ref_batch=2048, batch_size=6),
        probe=dict(every=2, batch_size=4),  # the tree's 6 validation images
    )
    trainer = Trainer(cfg, CPU)
    mean = trainer.objective.augment.mean.flatten().tolist()
    assert mean == pytest.approx([0.485, 0.456, 0.406])
    batch = next(trainer.data.train_batches(0, 6))
    # ceil(6 / 3) images, each three times in the step's batch, each time its own crop of the whole image
    assert len(batch) == 6 and batch.labels.tolist()[:3] == [batch.labels[0].item()] * 3
    assert batch.images.shape == (6, 3, 32, 32) and not torch.equal(batch.images[0], batch.images[1])
    images, targets = trainer.objective.inputs(batch, 0)
    assert images.shape == (6, 3, 32, 32) and targets.shape == (6, 3)
    assert np.isfinite(float(trainer.train_step(batch)))
    tracker = MemoryTracker()
    trainer.fit(tracker)  # the rest of the run, probes on the folder's validation JPEGs
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [2, 4]
    assert names.SEG_MIOU not in {key for _, key, _ in tracker.metrics}  # an ImageFolder has no masks
