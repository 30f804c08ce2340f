"""The norm and outlier probes find artifacts that we plant, where and when we plant them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trainers.config import ModelConfig, ProbeConfig
from trainers.data.base import Batch
from trainers.model import build_model
from trainers.probes import names, run_probes
from trainers.probes.outliers import robust_outliers

PLANTED = [0, 7, 56, 63]  # corner patches of the 8x8 grid: background in our test images
PLANT_NORM = 150.0  # ~30x the ~5 median patch norm of a random-init micro model
ABS_CUTOFF = 50.0
FROM_BLOCK = 2


def micro(registers: int = 0, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, embed_dim=64, depth=depth, num_heads=2, img_size=32, patch_size=4,
                      num_registers=registers)
    return build_model(cfg, num_classes=4)


def batch(size: int = 8) -> Batch:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.arange(size) % 4
    masks = torch.zeros(size, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = (labels + 1)[:, None, None]  # objects in the middle, corners are background
    return Batch(images, labels, masks)


def plant(model: torch.nn.Module, rows: list[int], from_block: int) -> list:
    """Force high-norm vectors into token rows (indices in the full sequence) of block outputs >= from_block."""
    seeded = torch.Generator().manual_seed(2)
    direction = torch.nn.functional.normalize(torch.randn(model.embed_dim, generator=seeded), dim=0)

    def hook(_module, _inputs, output):
        output = output.clone()
        output[:, rows] = direction * PLANT_NORM
        return output

    return [blk.register_forward_hook(hook) for blk in model.blocks[from_block:]]


def probe(model: torch.nn.Module):
    report = run_probes(model, batch(), ProbeConfig(outlier_cutoff=ABS_CUTOFF), figures=False)
    norms = np.load(io.BytesIO(report.files[names.NORMS_FILE]))
    return report.scalars, norms


def test_planted_patch_artifacts_are_found_from_their_block_on_by_both_detectors():
    model = micro()
    plant(model, [model.num_prefix_tokens + p for p in PLANTED], FROM_BLOCK)
    scalars, norms = probe(model)
    expected_map = np.zeros(64)
    expected_map[PLANTED] = 1.0
    for i in range(len(model.blocks)):
        planted = i >= FROM_BLOCK
        for detector in names.DETECTORS:
            frac = scalars[names.outlier_frac(names.block(i), detector)]
            assert frac == pytest.approx(len(PLANTED) / 64 if planted else 0.0), (i, detector)
            np.testing.assert_array_equal(norms[f"outlier_map_{detector}"][i].flatten(), expected_map * planted)
    assert scalars[names.outlier_frac(names.OUTPUT)] == pytest.approx(len(PLANTED) / 64)
    assert scalars[names.norm_stat("max_over_median", "patch", names.OUTPUT)] > 10
    assert names.NEIGHBOUR_COS_OUTLIER in scalars  # the Fig. 5a probe runs once there are outliers
    # [CLS]'s attention mass on the outliers: its attention map summed over the planted corners,
    # averaged over the 8 probe images (all of them kept in attention.npz).
    report = run_probes(model, batch(), ProbeConfig(outlier_cutoff=ABS_CUTOFF), figures=False)
    attention = np.load(io.BytesIO(report.files[names.ATTENTION_FILE]))
    corners = np.zeros((8, 8), dtype=bool)
    corners.flat[PLANTED] = True
    assert (attention["outlier_mask"] == corners).all()
    on_corners = attention["cls_attn"][:, corners].sum(axis=1).mean()
    assert scalars[names.attn("outlier_mass", "cls")] == pytest.approx(on_corners, rel=1e-5)
    assert 0 < on_corners < 1


def test_planted_register_norms_leave_patches_clean():
    model = micro(registers=2)
    plant(model, [1, 2], FROM_BLOCK)  # after [CLS]: the two registers
    scalars, norms = probe(model)
    for i in range(len(model.blocks)):
        for detector in names.DETECTORS:
            assert scalars[names.outlier_frac(names.block(i), detector)] == 0.0
    patch_median = scalars[names.norm_stat("median", "patch", names.OUTPUT)]
    for token in ("reg", "reg_00", "reg_01"):
        assert scalars[names.norm_stat("mean", token, names.OUTPUT)] == pytest.approx(PLANT_NORM, rel=1e-4)
    assert scalars[names.norm_stat("mean", "reg", names.block(FROM_BLOCK))] > 10 * patch_median
    assert scalars[names.norm_stat("mean", "reg", names.block(FROM_BLOCK - 1))] < patch_median
    assert norms["hist_reg"].shape == (4, 2, len(names.NORM_BIN_EDGES) - 1)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("dims", [(64, 4, 2, 32, 4), (96, 6, 3, 64, 8)])
def test_healthy_random_init_model_has_no_robust_outliers(registers, dims):
    width, depth, heads, img, patch = dims
    torch.manual_seed(3)
    cfg = ModelConfig(size=None, embed_dim=width, depth=depth, num_heads=heads, img_size=img, patch_size=patch,
                      num_registers=registers)
    model = build_model(cfg, num_classes=4)
    images = torch.randn(16, 3, img, img)
    report = run_probes(model, Batch(images, torch.arange(16) % 4), ProbeConfig(), figures=False)
    for i in range(depth):
        assert report.scalars[names.outlier_frac(names.block(i), "robust")] == 0.0


@pytest.mark.parametrize(
    "sample",
    [
        lambda g: 10 + torch.randn(50_000, generator=g),  # narrow normal
        lambda g: (10 + 3 * torch.randn(50_000, generator=g)).clamp_min(0.1),  # wide normal
        lambda g: torch.exp(0.5 * torch.randn(50_000, generator=g)),  # log-normal, heavy right tail
        lambda g: torch.randn(50_000, 64, generator=g).norm(dim=1),  # norms of Gaussian vectors (chi)
        lambda g: 5 * (1 + 1e-4 * torch.randn(50_000, generator=g)),  # nearly constant: MAD ~ 0
    ],
)
def test_robust_detector_flags_nothing_on_unimodal_norms(sample):
    mask, _ = robust_outliers(sample(torch.Generator().manual_seed(0)))
    assert not mask.any()


def test_robust_detector_finds_the_high_mode_of_a_bimodal_mixture():
    generator = torch.Generator().manual_seed(0)
    normal = 5 + 0.5 * torch.randn(9800, generator=generator)
    high = 50 + 5 * torch.randn(200, generator=generator)
    mask, cut = robust_outliers(torch.cat([normal, high]))
    assert mask[9800:].all() and not mask[:9800].any()
    assert 5 < cut < 35


def test_robust_detector_ignores_a_mild_bump_on_a_narrow_distribution():
    """A 1.5x group is 50 sigmas out when norms vary by 1%, but it is no 10x artifact."""
    generator = torch.Generator().manual_seed(0)
    norms = 5 * (1 + 0.01 * torch.randn(10_000, generator=generator))
    norms[:100] *= 1.5
    mask, _ = robust_outliers(norms)
    assert not mask.any()
