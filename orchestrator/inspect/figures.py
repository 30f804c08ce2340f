"""Side-by-side figures of the inspected models, from each probe's norms.npz and attention.npz:

* norm_hist.png: output token norms per model (paper Fig. 3): bimodal where there are artifacts;
* outliers_by_block.png: share of outlier patches after each block against relative depth (Fig. 4);
* attention.png: last-block [CLS] attention per model on the same probe images, outliers
  ringed (Fig. 1), and each model's registers (trained or test-time) beside it.

matplotlib's object API with an Agg canvas: nothing touches pyplot's global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trainers.probes import names

MAX_IMAGES = 4
MAX_REGISTERS = 2


def load_npz(data: bytes | None) -> dict[str, np.ndarray] | None:
    if data is None:
        return None
    with np.load(io.BytesIO(data)) as npz:
        return {key: npz[key] for key in npz.files}


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def norm_histograms(columns: Sequence[str], norms: Sequence[dict[str, np.ndarray]], cutoffs: Sequence[float], out: Path) -> Path:
    """One panel per model: output norms of patches, [CLS] and registers (log-log), robust threshold dotted, absolute cutoff dashed."""
    cols = min(3, len(columns))
    rows = -(-len(columns) // cols)
    fig = _figure(4.6 * cols, 3.2 * rows)
    for i, (column, data, cutoff) in enumerate(zip(columns, norms, cutoffs)):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = data["bin_edges"]
        ax.stairs(data["hist_patch"][-1], edges, fill=True, alpha=0.6, label="patch tokens")
        if data["hist_cls"][-1].any():
            ax.stairs(data["hist_cls"][-1], edges, linewidth=1.5, label="[CLS]")
        if data["hist_reg"].shape[1]:
            ax.stairs(data["hist_reg"][-1].sum(0), edges, linewidth=1.5, label="registers")
        ax.axvline(float(data["robust_threshold"][-1]), color="k", linestyle=":", linewidth=1, label="robust threshold")
        ax.axvline(cutoff, color="tab:red", linestyle="--", linewidth=1, label=f"cutoff {cutoff:g}")
        ax.set_xscale("log")
        counts = data["hist_patch"][-1] + data["hist_cls"][-1] + data["hist_reg"][-1].sum(0)
        used = np.nonzero(counts)[0]
        if len(used):  # the occupied range and both thresholds, not the whole 1e-2..1e4 of the bins
            low = min(edges[used[0]], float(data["robust_threshold"][-1]), cutoff) / 2
            ax.set_xlim(low, max(edges[used[-1] + 1], float(data["robust_threshold"][-1]), cutoff) * 2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("L2 norm of output token")
        ax.set_title(column, fontsize=8)
        if i == 0:
            ax.set_ylabel("tokens")
            ax.legend(fontsize=6)
    fig.suptitle("Output token norms (paper Fig. 3): a separate high mode = artifact tokens", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def outliers_by_block(columns: Sequence[str], norms: Sequence[dict[str, np.ndarray]], out: Path) -> Path:
    """Outlier fraction (robust detector) after each block against relative depth, one line per model."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for column, data in zip(columns, norms):
        fractions = np.asarray(data["outlier_frac_robust"], dtype=float)
        depth = len(fractions)
        ax.plot((np.arange(depth) + 1) / depth, 100 * fractions, marker="o", markersize=3, label=f"{column} ({depth} blocks)")
    ax.set_xlabel("relative depth (block / number of blocks)")
    ax.set_ylabel("outlier patches (%)")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("High-norm patch tokens by block (paper Fig. 4): where the artifacts separate", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def attention_maps(columns: Sequence[str], attention: Sequence[dict[str, np.ndarray]], out: Path) -> Path:
    """Rows: the probe images, then per model its [CLS] map (outliers ringed) and up to two register maps."""
    panels: list[tuple[str, str, dict[str, np.ndarray], int | None]] = []  # (title, kind, data, register)
    first = attention[0]
    panels.append(("input", "image", first, None))
    for column, data in zip(columns, attention):
        panels.append((f"[CLS]\n{column}", "cls", data, None))
        for r in range(min(MAX_REGISTERS, data["reg_attn"].shape[1])):
            panels.append((f"register {r}\n{column}", "reg", data, r))
    n_images = min(MAX_IMAGES, first["images"].shape[0])
    fig = _figure(1.9 * len(panels), 2.0 * n_images + 0.6)
    for row in range(n_images):
        for col, (title, kind, data, reg) in enumerate(panels):
            ax = fig.add_subplot(n_images, len(panels), row * len(panels) + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=6)
            if row >= data["images"].shape[0]:
                continue
            if kind == "image":
                ax.imshow(data["images"][row])
            elif kind == "cls":
                ax.imshow(data["cls_attn"][row], cmap="inferno")
                ys, xs = np.nonzero(data["outlier_mask"][row])
                ax.scatter(xs, ys, s=14, facecolors="none", edgecolors="cyan", linewidths=0.8)
            else:
                ax.imshow(data["reg_attn"][row, reg], cmap="inferno")
    fig.suptitle("Last-block attention (paper Fig. 1); cyan rings: output outlier patches", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def draw_all(columns: Sequence[str], files: Sequence[dict[str, bytes]], cutoffs: Sequence[float], folder: Path) -> dict[str, Path]:
    """Every figure the probe files allow; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    norms = [load_npz(f.get(names.NORMS_FILE)) for f in files]
    attention = [load_npz(f.get(names.ATTENTION_FILE)) for f in files]
    drawn: dict[str, Path] = {}
    have = [(c, n, k) for c, n, k in zip(columns, norms, cutoffs) if n is not None]
    if have:
        drawn["norm_hist"] = norm_histograms([c for c, _, _ in have], [n for _, n, _ in have], [k for _, _, k in have], folder / "norm_hist.png")
        drawn["outliers_by_block"] = outliers_by_block([c for c, _, _ in have], [n for _, n, _ in have], folder / "outliers_by_block.png")
    with_attn = [(c, a) for c, a in zip(columns, attention) if a is not None]
    if with_attn:
        drawn["attention"] = attention_maps([c for c, _ in with_attn], [a for _, a in with_attn], folder / "attention.png")
    return drawn
