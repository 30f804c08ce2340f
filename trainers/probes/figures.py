"""PNG figures of one probe: norm histograms per block, attention grid, outlier map.

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

DPI = 72
CELL = 48  # pixels per attention-mosaic cell
PANEL = 0.86  # share of a histogram grid cell a panel fills, the rest is the gap


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def norm_histograms(norms: dict[str, np.ndarray]) -> bytes:
    """One panel per block (x: log10 norm over the fixed bins, y: log10(1 + count)).

    Blue: patches; red: [CLS]; green: registers pooled; dotted: robust detector threshold.
    """
    from matplotlib.collections import LineCollection

    log_edges = np.log10(norms["bin_edges"])
    x = (log_edges[:-1] + log_edges[1:]) / 2
    x_unit = (x - log_edges[0]) / (log_edges[-1] - log_edges[0]) * PANEL
    locations = list(norms["locations"])
    cols = min(6, len(locations))
    rows = math.ceil(len(locations) / cols)
    series = [("hist_patch", "tab:blue"), ("hist_cls", "tab:red")]
    counts = {key: np.log10(1 + norms[key].astype(float)) for key, _ in series}
    if norms["hist_reg"].shape[1]:
        counts["hist_reg"] = np.log10(1 + norms["hist_reg"].sum(1).astype(float))
        series.append(("hist_reg", "tab:green"))
    top = max(1e-9, max(float(c.max()) for c in counts.values()))

    fig = _figure(1.9 * cols, 1.3 * rows + 0.4)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - 0.4 / (1.3 * rows + 0.4)))
    lines, colors = [], []
    for i, location in enumerate(locations):
        left, bottom = i % cols, rows - 1 - i // cols
        for key, color in series:
            lines.append(np.column_stack([left + x_unit, bottom + counts[key][i] / top * PANEL]))
            colors.append(color)
        cut = (math.log10(norms["robust_threshold"][i]) - log_edges[0]) / (log_edges[-1] - log_edges[0]) * PANEL
        lines.append(np.array([[left + cut, bottom], [left + cut, bottom + PANEL]]))
        colors.append("0.3")
        ax.add_patch(_frame(left, bottom))
        ax.text(left + 0.02, bottom + PANEL - 0.02, f"{location} out={norms['outlier_frac_robust'][i]:.3f}",
                fontsize=6, va="top")
    ax.add_collection(LineCollection(lines, colors=colors, linewidths=0.8))
    ax.set_xlim(-0.05, cols)
    ax.set_ylim(-0.05, rows)
    ax.set_axis_off()
    fig.suptitle(f"token norms: x log10 {log_edges[0]:.0f}..{log_edges[-1]:.0f}, y log10(1+count) "
                 f"(max {10 ** top - 1:.0f}); blue patch, red cls, green reg", fontsize=7)
    return _png(fig)


def _frame(left: float, bottom: float):
    from matplotlib.patches import Rectangle

    return Rectangle((left, bottom), PANEL, PANEL, fill=False, linewidth=0.5, edgecolor="0.7")


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
    """One row per probe image: the image, the [CLS] map (outlier patches marked red), each register's map."""
    images, cls_maps, reg_maps = attention["images"], attention["cls_attn"], attention["reg_attn"]
    n, regs = images.shape[0], reg_maps.shape[1]
    rows = []
    for i in range(n):
        cls_cell = _resize(_coloured(np.nan_to_num(cls_maps[i])), CELL)
        marks = _resize(attention["outlier_mask"][i], CELL)
        cls_cell[marks & (np.indices(marks.shape).sum(0) % 4 == 0)] = (255, 0, 0)  # sparse red dots
        cells = [_resize(images[i], CELL), cls_cell]
        cells += [_resize(_coloured(reg_maps[i, r]), CELL) for r in range(regs)]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    mosaic = np.concatenate(rows, 0)
    height, width = mosaic.shape[:2]
    fig = _figure(width / DPI, (height + 14) / DPI)
    ax = fig.add_axes((0, 0, 1, height / (height + 14)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for col, title in enumerate(["image", "cls"] + [f"reg_{r:02d}" for r in range(regs)]):
        fig.text((col + 0.5) * (CELL + 2) / width, 1.0, title, fontsize=6, ha="center", va="top")
    return _png(fig)


def outlier_maps(norms: dict[str, np.ndarray]) -> bytes:
    """Output-layer outlier frequency per patch position (0..1), for both detectors."""
    fig = _figure(4.0, 2.2)
    for k, detector in enumerate(("robust", "abs")):
        ax = fig.add_axes((0.02 + 0.5 * k, 0.02, 0.46, 0.8))
        frequency = norms[f"outlier_map_{detector}"][-1]
        ax.imshow(frequency, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{detector}: max {frequency.max():.2f}", fontsize=7)
        ax.set_axis_off()
    fig.suptitle("outlier frequency per position (output)", fontsize=7)
    return _png(fig)
