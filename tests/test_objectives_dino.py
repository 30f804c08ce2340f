"""The subtle parts of the DINOv2 objective, against lightly's losses and the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss

from trainers.config import DataConfig, DinoConfig, ModelConfig, TrainConfig
from trainers.objectives.dino import encode
from trainers.objectives.dino_losses import (
    TeacherCentring,
    dino_cross_entropy,
    ibot_cross_entropy,
    masked_patches,
    sinkhorn_knopp,
)
from trainers.objectives.multicrop import ibot_masks, make_views, step_generator
from trainers.model import build_model

K = 32


def test_dino_cross_entropy_equals_lightly_dino_loss_with_momentum_centring() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(8, K) for _ in range(2)]
    student = [torch.randn(8, K) for _ in range(2 + 3)]  # 2 global, 3 local crops
    reference = DINOLoss(output_dim=K, teacher_temp=0.05, student_temp=0.1, center_momentum=0.9)
    reference.center.data = torch.randn(1, 1, K) * 0.1
    centring = TeacherCentring("momentum", K, 0.9)
    centring.centre.center = reference.center.data.view(1, K).clone()
    probs = centring(torch.cat(teacher), 0.05).chunk(2)
    ours = dino_cross_entropy(list(probs), student, 0.1)
    theirs = reference(teacher, student, teacher_temp=0.05)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # Both move the centre the same way: c <- 0.9 c + 0.1 mean(teacher logits).
    assert torch.allclose(centring.centre.value, reference.center.view(1, K), atol=1e-6)


def test_ibot_cross_entropy_equals_lightly_ibot_patch_loss() -> None:
    torch.manual_seed(1)
    masks = torch.rand(6, 4, 4) < 0.3
    masks[0] = False  # an image without a mask counts in the denominator, as in DINOv2
    m = int(masks.sum())
    teacher, student = torch.randn(m, K), torch.randn(m, K)
    reference = IBOTPatchLoss(output_dim=K, teacher_temp=0.05, student_temp=0.1)
    # Fixed-size slots: the m masked patches first, in order, then padding that must not count.
    patches = masked_patches(masks, m + 7)
    assert int(patches.valid.sum()) == m and bool(patches.valid[:m].all())
    padded_t, padded_s = torch.cat([teacher, torch.randn(7, K)]), torch.cat([student, torch.randn(7, K)])
    probs = F.softmax(padded_t / 0.05, dim=-1)  # lightly's centre starts at zero
    ours = ibot_cross_entropy(probs, padded_s, patches, 0.1)
    assert torch.allclose(ours, reference(teacher, student, masks), atol=1e-6)


def test_sinkhorn_knopp_balances_prototypes_and_keeps_samples_normalised() -> None:
    torch.manual_seed(2)
    logits = torch.randn(64, 16) + torch.linspace(0, 2, 16)  # some prototypes favoured by every sample
    q = sinkhorn_knopp(logits, 0.5, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)  # a distribution per sample
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 64 / 16), atol=1e-3)  # equal mass per prototype
    # The formula: Q = diag(u) exp(logits / tau) diag(v) for some scalings u, v (the ratio test).
    ratio = q / torch.exp((logits - logits.max()) / 0.5)
    rank_one = ratio / ratio[:, :1] / (ratio[:1] / ratio[:1, :1])
    assert torch.allclose(rank_one, torch.ones_like(rank_one), rtol=1e-3)


def test_sinkhorn_with_three_iterations_matches_dinov2s_loop() -> None:
    torch.manual_seed(3)
    logits = torch.randn(10, 7)
    q = torch.exp(logits / 0.07).t()
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True) * 7
        q /= q.sum(dim=0, keepdim=True) * 10
    assert torch.allclose(sinkhorn_knopp(logits, 0.07), (q * 10).t(), atol=1e-6)


def test_schedules_follow_dinov2() -> None:
    from trainers.data.shapes import ShapesSource
    from trainers.objectives.dino import DinoObjective

    cfg = TrainConfig(
        objective="dino", steps=100,
        model=ModelConfig(size="micro", img_size=16, patch_size=8),
        data=DataConfig(num_classes=2, train_size=8, val_size=8),
        dino=DinoConfig(head_prototypes=16, head_hidden_dim=16, head_bottleneck_dim=8, local_crops=0),
    )
    data = ShapesSource(num_classes=2, train_size=8, val_size=8, img_size=16, seed=0, device=torch.device("cpu"))
    dino = DinoObjective(cfg, data, torch.device("cpu"))
    first, mid, warm, last = (dino.schedule(s) for s in (0, 15, 30, 99))
    assert first["teacher_temp"] == pytest.approx(0.04) and mid["teacher_temp"] == pytest.approx(0.055)
    assert warm["teacher_temp"] == pytest.approx(0.07) and last["teacher_temp"] == pytest.approx(0.07)
    assert first["momentum"] == pytest.approx(0.992) and last["momentum"] == pytest.approx(1.0)
    half = dino.schedule(49)["momentum"]
    assert half == pytest.approx(1.0 - 0.008 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert first["weight_decay"] == pytest.approx(0.05) and last["weight_decay"] == pytest.approx(0.2)


def test_masks_follow_the_share_and_ratios_and_repeat_per_step() -> None:
    gen = step_generator(0, 7)
    masks = ibot_masks(40, (8, 8), (0.1, 0.5), 0.5, gen)
    per_image = masks.flatten(1).sum(1)
    assert int((per_image > 0).sum()) == 20  # half of the images get a mask
    assert per_image.max() <= 32 and per_image[per_image > 0].min() >= 6  # 10% to 50% of 64 patches
    again = ibot_masks(40, (8, 8), (0.1, 0.5), 0.5, step_generator(0, 7))
    assert torch.equal(masks, again)
    rows = torch.tensor([3, 17, 30])  # a rank's rows of the global masks: drawn for all, applied to its own
    assert torch.equal(ibot_masks(40, (8, 8), (0.1, 0.5), 0.5, step_generator(0, 7), rows), masks[rows])


def test_views_have_their_sizes_and_local_crops_use_interpolated_position_embeddings() -> None:
    crops = (torch.randn(6, 3, 32, 32), torch.randn(12, 3, 16, 16))  # the loader's, for 3 images, crop-major
    views = make_views(
        crops, seed=0, step=0, patch_size=8, mask_ratio=(0.1, 0.5), mask_probability=0.5, with_masks=True,
    )
    assert views.global_crops.shape == (6, 3, 32, 32) and views.local_crops.shape == (12, 3, 16, 16)
    assert views.masks.shape == (6, 4, 4)
    vit = build_model(ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=4), 0, dynamic_img_size=True)
    tokens = encode(vit, views.local_crops)
    assert tokens.shape == (12, 1 + 4 + 4, 64)  # [CLS] + 4 registers + a 2 x 2 grid
    # A masked patch's embedding is the mask token: with a mask everywhere, every image's tokens agree.
    token = torch.randn(1, 64)
    everything = torch.ones(6, 4, 4, dtype=torch.bool)
    masked = encode(vit.eval(), views.global_crops, everything, token)
    assert torch.allclose(masked[0], masked[1], atol=1e-5)


def dino_views(crops, share=(0, 1)):
    return make_views(
        crops, seed=3, step=5, patch_size=8, mask_ratio=(0.1, 0.5), mask_probability=0.5, with_masks=True, share=share,
    )


def test_views_of_two_ranks_are_the_one_process_views_of_their_images() -> None:
    """Jitter and masks are drawn for the global batch; a rank applies its images' rows."""
    glob, loc = torch.randn(2 * 8, 3, 32, 32), torch.randn(4 * 8, 3, 16, 16)  # 8 images, crop-major
    whole = dino_views((glob, loc))
    for rank in (0, 1):
        mine = [rank * 4 + i for i in range(4)]
        rows_g = [c * 8 + i for c in range(2) for i in mine]
        rows_l = [c * 8 + i for c in range(4) for i in mine]
        part = dino_views((glob[rows_g], loc[rows_l]), share=(rank, 2))
        assert torch.equal(part.global_crops, whole.global_crops[rows_g])
        assert torch.equal(part.local_crops, whole.local_crops[rows_l])
        assert torch.equal(part.masks, whole.masks[rows_g])


def test_views_under_bf16_autocast_are_the_fp32_views() -> None:
    crops = (torch.randn(8, 3, 32, 32), torch.randn(16, 3, 16, 16))
    plain = dino_views(crops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dino_views(crops)
    assert mixed.global_crops.dtype == torch.float32
    assert torch.equal(mixed.global_crops, plain.global_crops) and torch.equal(mixed.local_crops, plain.local_crops)
