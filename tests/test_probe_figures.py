"""The per-trial probe figures are legible at the size MLflow's artifact view shows them
(the PNG's own size): at most MAX_WIDTH_PX wide, no text under MIN_TEXT_PX; an empty outlier
map says so instead of showing a black square."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from trainers.probes import figures, names

BINS = len(names.NORM_BIN_EDGES) - 1


def norms(depth: int, regs: int = 4, outliers: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(depth)
    centres = np.sqrt(names.NORM_BIN_EDGES[:-1] * names.NORM_BIN_EDGES[1:])

    def hist(mean: float, n: int) -> np.ndarray:
        return np.histogram(np.exp(rng.normal(np.log(mean), 0.2, n)), bins=names.NORM_BIN_EDGES)[0]

    out_map = np.zeros((depth, 8, 8))
    if outliers:
        out_map[-1, 2, 3], out_map[-1, 6, 1] = 0.5, 1.0
    return {
        "bin_edges": names.NORM_BIN_EDGES,
        "locations": np.array([names.block(i) for i in range(depth)]),
        "hist_patch": np.stack([hist(5.0 + i, 256) for i in range(depth)]),
        "hist_cls": np.stack([hist(30.0, 8) for _ in range(depth)]),
        "hist_reg": np.stack([np.stack([hist(60.0, 8) for _ in range(regs)]) for _ in range(depth)])
        if regs else np.zeros((depth, 0, BINS), int),
        "robust_threshold": np.full(depth, float(centres[80])),
        "outlier_frac_robust": np.linspace(0, 0.02, depth),
        "outlier_map_robust": out_map,
        "outlier_map_abs": np.zeros((depth, 8, 8)),
    }


def attention(regs: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(regs)
    return {
        "images": rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
        "cls_attn": rng.random((3, 8, 8)),
        "reg_attn": rng.random((3, regs, 8, 8)),
        "outlier_mask": np.zeros((3, 8, 8), bool),
    }


def texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def check_legible(fig) -> None:
    png = io.BytesIO(figures._png(fig))
    width, _ = Image.open(png).size
    assert width <= figures.MAX_WIDTH_PX
    for text in texts(fig):
        pixels = text.get_fontsize() * figures.DPI / 72
        assert pixels >= figures.MIN_TEXT_PX - 1e-6, (text.get_text(), pixels)


@pytest.mark.parametrize("depth,regs", [(4, 0), (6, 4), (24, 16)])
def test_norm_histograms_are_legible_and_keep_the_first_block_and_the_output(depth: int, regs: int) -> None:
    fig = figures.norm_histogram_figure(norms(depth, regs))
    check_legible(fig)
    titles = [t.get_text().split()[0] for t in texts(fig) if t.get_text().startswith("block_")]
    assert len(titles) == min(depth, figures.MAX_PANELS)
    assert titles[0] == "block_00" and titles[-1] == names.block(depth - 1)
    assert ("registers" in {t.get_text() for t in texts(fig)}) == bool(regs)


@pytest.mark.parametrize("regs", [0, 4, 16])
def test_attention_grid_is_legible_with_up_to_16_registers(regs: int) -> None:
    check_legible(figures.attention_grid_figure(attention(regs)))


def test_an_empty_outlier_map_says_no_outliers() -> None:
    fig = figures.outlier_map_figure(norms(4))
    check_legible(fig)
    assert [t.get_text() for t in texts(fig)].count("no outliers") == 2
    assert not any(ax.images for ax in fig.axes)  # no black (or any) square drawn from zeros


def test_an_outlier_map_with_outliers_shows_them_on_white() -> None:
    fig = figures.outlier_map_figure(norms(4, outliers=True))
    check_legible(fig)
    shown = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(shown) == 1 and [t.get_text() for t in texts(fig)].count("no outliers") == 1
    colour_of_zero = shown[0].cmap(shown[0].norm(0.0))
    assert min(colour_of_zero[:3]) > 0.9  # a patch that never holds an outlier is (near) white
