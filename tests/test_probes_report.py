"""run_probes end to end on a micro model: the scalar names, file layouts, PNGs and side effects."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import ModelConfig, ProbeConfig
from trainers.data.base import Batch
from trainers.model import build_model
from trainers.probes import ProbeReport, names, run_probes

DEPTH, REGS, GRID, N_IMAGES = 3, 2, 8, 12


def model(registers: int = REGS):
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, embed_dim=32, depth=DEPTH, num_heads=2, img_size=32, patch_size=4,
                      num_registers=registers)
    return build_model(cfg, num_classes=3)


def batch(masks: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_IMAGES) % 3
    mask = torch.zeros(N_IMAGES, 32, 32, dtype=torch.long)
    mask[:, 8:24, 4:20] = (labels + 1)[:, None, None]
    return Batch(torch.randn(N_IMAGES, 3, 32, 32, generator=g), labels, mask if masks else None)


@pytest.fixture(scope="module")
def report() -> ProbeReport:
    return run_probes(model(), batch(), ProbeConfig(), figures=True)


def test_scalars_cover_every_block_and_the_output(report):
    s = report.scalars
    for i in range(DEPTH):
        loc = names.block(i)
        for key in (names.outlier_frac(loc, "robust"), names.outlier_frac(loc, "abs"),
                    names.norm_stat("median", "patch", loc), names.norm_stat("max_over_median", "patch", loc),
                    names.norm_stat("mean", "cls", loc), names.norm_stat("mean", "reg", loc)):
            assert key in s
        assert names.norm_stat("mean", "reg_00", loc) not in s  # per-register scalars only at the output
    for stat in ("mean", "median", "p99", "max", "max_over_median"):
        for token in ("patch", "cls", "reg", "reg_00", "reg_01"):
            assert names.norm_stat(stat, token, names.OUTPUT) in s
    for query in ("cls", "reg_00", "reg_01"):
        assert 0 <= s[names.attn("entropy", query)] <= 1
        assert 0 <= s[names.attn("tv", query)] <= 4
    for key in (names.attn("outlier_mass", "cls"), names.SEG_MIOU, names.CORLOC, names.PROBE_SECONDS,
                names.NEIGHBOUR_COS_NORMAL, names.linear_probe("class_acc", "cls"),
                names.linear_probe("class_acc", "reg"), names.linear_probe("position_acc", "normal")):
        assert key in s
    assert names.NEIGHBOUR_COS_OUTLIER not in s  # a random-init model has no outliers
    assert all(math.isfinite(v) for v in s.values())
    assert s[names.PROBE_SECONDS] == report.seconds > 0


def test_norms_file_layout(report):
    a = np.load(io.BytesIO(report.files[names.NORMS_FILE]))
    bins = len(names.NORM_BIN_EDGES) - 1
    np.testing.assert_array_equal(a["bin_edges"], names.NORM_BIN_EDGES)
    assert a["hist_patch"].shape == a["hist_cls"].shape == (DEPTH, bins)
    assert a["hist_reg"].shape == (DEPTH, REGS, bins)
    assert (a["hist_patch"].sum(1) == N_IMAGES * GRID * GRID).all()  # out-of-range norms land in end bins
    assert (a["hist_reg"].sum(2) == N_IMAGES).all()
    assert a["stats_patch"].shape == a["stats_cls"].shape == (DEPTH, 5)
    assert a["stats_reg"].shape == (DEPTH, REGS, 5)
    assert a["outlier_frac_robust"].shape == a["outlier_frac_abs"].shape == (DEPTH,)
    assert a["outlier_map_robust"].shape == (DEPTH, GRID, GRID)
    assert a["token_norms_output"].shape == (N_IMAGES, 1 + REGS + GRID * GRID)
    assert list(a["locations"]) == [names.block(i) for i in range(DEPTH)]


def test_attention_file_layout(report):
    a = np.load(io.BytesIO(report.files[names.ATTENTION_FILE]))
    n = min(8, N_IMAGES)
    assert a["images"].shape == (n, 32, 32, 3) and a["images"].dtype == np.uint8
    assert a["cls_attn"].shape == (n, GRID, GRID)
    assert a["reg_attn"].shape == (n, REGS, GRID, GRID)
    assert a["outlier_mask"].shape == (n, GRID, GRID) and a["outlier_mask"].dtype == bool
    np.testing.assert_allclose(a["cls_attn"].sum((1, 2)), 1.0, rtol=1e-5)


def test_figures_are_valid_pngs(report):
    for name in (names.NORM_HIST_FIGURE, names.ATTENTION_FIGURE, names.OUTLIER_MAP_FIGURE):
        image = Image.open(io.BytesIO(report.files[name]))
        assert image.format == "PNG"
        image.verify()


def test_figures_follow_the_config_unless_overridden():
    vit = model()
    without = run_probes(vit, batch(), ProbeConfig(figures="off"))
    assert set(without.files) == {names.NORMS_FILE, names.ATTENTION_FILE}
    assert names.ATTENTION_FIGURE in run_probes(vit, batch(), ProbeConfig(figures="off"), figures=True).files


def test_real_data_without_masks_skips_mask_metrics_and_train_mode_is_restored():
    vit = model(registers=0)
    vit.train()
    result = run_probes(vit, batch(masks=False), ProbeConfig(), figures=False)
    assert vit.training
    assert names.SEG_MIOU not in result.scalars and names.CORLOC not in result.scalars
    assert not any("/reg" in key for key in result.scalars)
    assert all(p.grad is None for p in vit.parameters())
