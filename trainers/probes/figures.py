"""PNG figures of one probe: norm histograms per block, attention grid, outlier map.

They are read in MLflow's artifact view, which shows a PNG at its own size: sizes are set in
pixels, every figure stays within MAX_WIDTH_PX and no text is under MIN_TEXT_PX.

Speed matters (figures are drawn inside training), and matplotlib's cost is per Axes, so
every figure has at most two Axes: the histogram "grid" lays its panels out in data
coordinates of one Axes, and the attention grid is a numpy mosaic shown by one imshow.
Drawing uses matplotlib's object API with an Agg canvas, never pyplot, so nothing touches
the global backend or figure registry. matplotlib is imported only when figures are drawn.
"""

from __future__ import annotations

import io
import math

import numpy as np

DPI = 100
# Sizes in pixels of the PNG, which MLflow's artifact view shows at its own size: every figure
# stays within MAX_WIDTH_PX and every text is at least MIN_TEXT_PX tall (tests/test_probe_figures.py).
MAX_WIDTH_PX = 800
MIN_TEXT_PX = 12
TEXT_PX = 14
CELL = 48  # pixels per attention-mosaic cell
PANEL = 0.86  # share of a histogram grid cell a panel fills, the rest is the gap
MAX_PANELS = 6  # norm histogram panels: every block up to this, else evenly spaced ones and the output
HIST_COLS = 3
SERIES = (("hist_patch", "tab:blue", "patches"), ("hist_cls", "tab:red", "[CLS]"), ("hist_reg", "tab:green", "registers"))


def _pt(pixels: float) -> float:
    """Font size in points for a text `pixels` tall in the PNG."""
    return pixels * 72 / DPI


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(width_px: float, height_px: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI))


def shown_locations(count: int, most: int = MAX_PANELS) -> list[int]:
    """Indices of the locations drawn: all of them up to `most`, else evenly spaced ones that
    always include the first block and the output (the last)."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def norm_histograms(norms: dict[str, np.ndarray]) -> bytes:
    return _png(norm_histogram_figure(norms))


def norm_histogram_figure(norms: dict[str, np.ndarray]):
    """Token-norm histograms, one panel per location (up to MAX_PANELS: deep models show evenly
    spaced blocks and the output), three to a row, x zoomed to the occupied norms.

    Blue: patches; red: [CLS]; green: registers pooled; dotted: the robust detector's cutoff.
    """
    from matplotlib.collections import LineCollection

    log_edges = np.log10(norms["bin_edges"])
    centres = (log_edges[:-1] + log_edges[1:]) / 2
    shown = shown_locations(len(norms["locations"]))
    series = [(key, colour, label) for key, colour, label in SERIES if key != "hist_reg" or norms["hist_reg"].shape[1]]
    counts = {key: np.log10(1 + norms[key].astype(float)) for key, _, _ in series if key != "hist_reg"}
    if any(key == "hist_reg" for key, _, _ in series):
        counts["hist_reg"] = np.log10(1 + norms["hist_reg"].sum(1).astype(float))
    top = max(1e-9, max(float(counts[key][shown].max()) for key in counts))
    cuts = np.log10(np.maximum(norms["robust_threshold"][shown], 1e-12))
    lo, hi = _occupied_range(np.stack([counts[key][shown] for key in counts]), centres, cuts)
    x_unit = (centres - lo) / (hi - lo) * PANEL
    inside = (centres >= lo) & (centres <= hi)

    cols = min(HIST_COLS, len(shown))
    rows = math.ceil(len(shown) / cols)
    panel_px, header_px, title_px = 250, 56, 24  # a panel's cell, the key above, each panel's title
    width, height = cols * panel_px + 20, rows * (panel_px * 0.62 + title_px) + header_px
    fig = _figure(width, height)
    cell_h = PANEL + title_px / (panel_px * 0.62)  # a row: the panel and its title, in panel units
    ax = fig.add_axes((10 / width, 4 / height, 1 - 20 / width, 1 - (header_px + 4) / height))
    lines, colours, cut_lines = [], [], []
    for slot, i in enumerate(shown):
        left, bottom = slot % cols, (rows - 1 - slot // cols) * cell_h
        for key, colour, _ in series:
            lines.append(np.column_stack([left + x_unit[inside], bottom + counts[key][i][inside] / top * PANEL]))
            colours.append(colour)
        cut = (cuts[slot] - lo) / (hi - lo) * PANEL
        if 0 <= cut <= PANEL:
            cut_lines.append(np.array([[left + cut, bottom], [left + cut, bottom + PANEL]]))
        ax.add_patch(_frame(left, bottom))
        share = float(norms["outlier_frac_robust"][i])
        ax.text(left, bottom + PANEL + 0.03, f"{norms['locations'][i]}   outliers {share:.1%}",
                fontsize=_pt(TEXT_PX), va="bottom")
        if slot // cols == rows - 1:  # norm ticks under the bottom row
            for value in _ticks(lo, hi):
                ax.text(left + (value - lo) / (hi - lo) * PANEL, bottom - 0.03, f"{10 ** value:g}",
                        fontsize=_pt(MIN_TEXT_PX), ha="center", va="top", color="0.35")
    ax.add_collection(LineCollection(lines, colors=colours, linewidths=1.4))
    ax.add_collection(LineCollection(cut_lines, colors="0.3", linestyles=":", linewidths=1.2))
    ax.set_xlim(-0.02, cols)
    ax.set_ylim(-0.22, rows * cell_h)
    ax.set_axis_off()
    fig.text(10 / width, 1 - 6 / height, "token norm (log scale) vs log count", fontsize=_pt(TEXT_PX), va="top")
    key_x = 10 / width
    for _, colour, label in series:
        fig.text(key_x, 1 - 30 / height, label, color=colour, fontsize=_pt(TEXT_PX), va="top", weight="bold")
        key_x += (len(label) * 9 + 22) / width
    fig.text(key_x, 1 - 30 / height, "dotted: outlier cutoff", color="0.3", fontsize=_pt(TEXT_PX), va="top")
    return fig


def _occupied_range(counts: np.ndarray, centres: np.ndarray, cuts: np.ndarray) -> tuple[float, float]:
    """log10 norm range holding every non-empty bin and cutoff, padded, at least one decade wide."""
    filled = np.nonzero(counts.reshape(-1, counts.shape[-1]).max(0) > 0)[0]
    points = np.concatenate([centres[filled] if filled.size else centres[[0, -1]], cuts])
    lo, hi = float(points.min()) - 0.15, float(points.max()) + 0.15
    if hi - lo < 1:
        middle = (lo + hi) / 2
        lo, hi = middle - 0.5, middle + 0.5
    return max(lo, float(centres[0])), min(hi, float(centres[-1]))


def _ticks(lo: float, hi: float) -> list[float]:
    """Whole decades inside (lo, hi), thinned to at most four."""
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    step = max(1, math.ceil(len(decades) / 4))
    return [float(d) for d in decades[::step]]


def _frame(left: float, bottom: float):
    from matplotlib.patches import Rectangle

    return Rectangle((left, bottom), PANEL, PANEL, fill=False, linewidth=0.8, edgecolor="0.7")


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of [h, w, ...] to [size, size, ...] (no extra dependency)."""
    rows = np.arange(size) * array.shape[0] // size
    cols = np.arange(size) * array.shape[1] // size
    return array[rows][:, cols]


def _coloured(attention_map: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    span = float(attention_map.max() - attention_map.min())
    unit = (attention_map - attention_map.min()) / span if span > 0 else np.zeros_like(attention_map)
    return (colormaps["viridis"](unit)[..., :3] * 255).astype(np.uint8)


def attention_grid(attention: dict[str, np.ndarray]) -> bytes:
    return _png(attention_grid_figure(attention))


def attention_grid_figure(attention: dict[str, np.ndarray]):
    """One row per probe image: the image, the [CLS] map (outlier patches marked red), each register's map."""
    images, cls_maps, reg_maps = attention["images"], attention["cls_attn"], attention["reg_attn"]
    n, regs = images.shape[0], reg_maps.shape[1]
    cell = min(CELL, MAX_WIDTH_PX // (2 + regs) - 2)  # 16 registers still fit the width
    rows = []
    for i in range(n):
        cls_cell = _resize(_coloured(np.nan_to_num(cls_maps[i])), cell)
        marks = _resize(attention["outlier_mask"][i], cell)
        cls_cell[marks & (np.indices(marks.shape).sum(0) % 4 == 0)] = (255, 0, 0)  # sparse red dots
        cells = [_resize(images[i], cell), cls_cell]
        cells += [_resize(_coloured(reg_maps[i, r]), cell) for r in range(regs)]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    mosaic = np.concatenate(rows, 0)
    height, width = mosaic.shape[:2]
    header = TEXT_PX + 10
    fig = _figure(width, height + header)
    ax = fig.add_axes((0, 0, 1, height / (height + header)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for col, title in enumerate(["image", "[CLS]"] + [f"reg {r}" for r in range(regs)]):
        fig.text((col + 0.5) * (cell + 2) / width, 1 - 4 / (height + header), title,
                 fontsize=_pt(MIN_TEXT_PX), ha="center", va="top")
    return fig


def outlier_maps(norms: dict[str, np.ndarray]) -> bytes:
    return _png(outlier_map_figure(norms))


def outlier_map_figure(norms: dict[str, np.ndarray]):
    """Output-layer outlier frequency per patch position (share of probe images in which the
    patch is an outlier; white 0, dark red 1), for both detectors. A detector that flagged
    nothing gets a grey panel that says so."""
    width, height, header = 520, 300, 64
    fig = _figure(width, height)
    fig.text(0.5, 1 - 6 / height, "Where outliers sit at the output", fontsize=_pt(TEXT_PX), ha="center", va="top")
    fig.text(0.5, 1 - 28 / height, "share of probe images with an outlier at each patch",
             fontsize=_pt(MIN_TEXT_PX), ha="center", va="top", color="0.35")
    side = (height - header - 34) / height
    for k, detector in enumerate(("robust", "abs")):
        ax = fig.add_axes((0.06 + 0.5 * k, 6 / height, side * height / width, side))
        frequency = norms[f"outlier_map_{detector}"][-1]
        label = {"robust": "scale-free detector", "abs": "absolute cutoff"}[detector]
        if frequency.max() > 0:
            ax.imshow(frequency, cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
            label += f": up to {frequency.max():.0%}"
        else:
            ax.set_facecolor("0.93")
            ax.text(0.5, 0.5, "no outliers", transform=ax.transAxes, ha="center", va="center",
                    fontsize=_pt(TEXT_PX), color="0.3")
        ax.set_title(label, fontsize=_pt(MIN_TEXT_PX))
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
