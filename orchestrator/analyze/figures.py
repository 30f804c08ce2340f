"""Figures drawn from logged scalars: emergence heatmaps and metrics against register count
(paper Fig. 8). Matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.analyze import catalog as cat  # noqa: E402
from orchestrator.analyze.emergence import depth_grid, progress_grid  # noqa: E402


def save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _heatmap(ax: plt.Axes, grid: pd.DataFrame, threshold: float, vmax: float, xfmt: str = "{:g}") -> None:
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, origin="upper")
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    columns = list(grid.columns)
    stride = max(1, math.ceil(len(columns) / 12))  # keep tick labels readable for long sweeps
    ticks = list(range(0, len(columns), stride))
    ax.set_xticks(ticks, [xfmt.format(columns[i]) for i in ticks], rotation=45)
    # Mark the cells above the threshold, so that the emergence point can be read off.
    above = grid.to_numpy(dtype=float) > threshold
    for y, x in zip(*np.nonzero(above)):
        ax.text(x, y, "+", ha="center", va="center", color="cyan", fontsize=7)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="outlier fraction")


def emergence_progress_figure(points: pd.DataFrame, threshold: float, out: Path) -> Path | None:
    """Outlier fraction at the output: model size (per objective) x training progress, one panel per length."""
    lengths = sorted(points["steps"].unique())
    if not lengths:
        return None
    vmax = max(float(points["value"].max()), threshold * 2)
    height = 0.6 * points["group"].nunique() + 2.2
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), height), squeeze=False, layout="constrained")
    for ax, steps in zip(axes[0], lengths):
        _heatmap(ax, progress_grid(points, steps), threshold, vmax, "{:.2f}")
        ax.set_title(f"{steps} training steps")
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("model size")
    fig.suptitle(f"Outlier fraction at the output, no registers ('+': above {threshold:g})")
    return save(fig, out)


def emergence_depth_figure(points: pd.DataFrame, size: str, threshold: float, out: Path) -> Path | None:
    """Outlier fraction of one group (a size, or objective/size): block depth x training step, one
    panel per training length."""
    sel = points[points["group"] == size]
    lengths = sorted(sel["steps"].unique())
    if not lengths:
        return None
    vmax = max(float(points["value"].max()), threshold * 2)
    depth = sel["location"].nunique()
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.8 * len(lengths), 0.35 * depth + 2.2), squeeze=False, layout="constrained")
    for ax, steps in zip(axes[0], lengths):
        _heatmap(ax, depth_grid(points, size, steps), threshold, vmax)
        ax.set_title(f"{size}, {steps} training steps")
        ax.set_xlabel("training step")
        ax.set_ylabel("location (residual stream)")
    fig.suptitle(f"Outlier fraction by depth and step, {size}, no registers ('+': above {threshold:g})")
    return save(fig, out)


def register_effect_figure(stats: pd.DataFrame, steps_used: dict[str, int], out: Path) -> Path | None:
    """Paper Fig. 8: each metric against the register count, one line per model size (per objective
    when several were swept), 95% intervals."""
    metrics = [m for m in cat.REGISTER_METRICS if m.short in set(stats["metric"])]
    if not metrics:
        return None
    counts = sorted(stats["num_registers"].unique())
    position = {c: i for i, c in enumerate(counts)}  # 0,1,2,4,8,16 evenly spaced, as in the paper
    fig, axes = metric_panels(len(metrics))
    sizes = sorted(stats["group"].unique(), key=cat.group_sort_key)
    depth_of = stats["register_depth"] if "register_depth" in stats else pd.Series(0, index=stats.index)
    for ax, spec in zip(axes.flat, metrics):
        for size in sizes:
            steps = steps_used.get(size, stats[stats["group"] == size]["steps"].max())
            cell = (stats["group"] == size) & (stats["steps"] == steps) & (stats["metric"] == spec.short)
            # One line per entry depth: registers from the input solid, later entries dashed from the same
            # no-register point (registers.py's settings; the depth figure shows the other cut).
            for depth in sorted(depth_of[cell].unique()):
                sel = stats[cell & ((depth_of == depth) | (stats["num_registers"] == 0))].sort_values("num_registers")
                if sel.empty or not (sel["num_registers"] > 0).any() and depth:
                    continue
                x = [position[c] for c in sel["num_registers"]]
                low = (sel["mean"] - sel["ci_low"]).fillna(0).clip(lower=0)
                high = (sel["ci_high"] - sel["mean"]).fillna(0).clip(lower=0)
                label = f"{size} ({steps} steps)" + (f", registers from block {depth}" if depth else "")
                ax.errorbar(x, sel["mean"], yerr=[low, high], marker="o", capsize=3, label=label, linestyle="--" if depth else "-")
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("number of registers")
        title_panel(ax, spec)
    return finish_panels(fig, axes, len(metrics), "Metrics against the number of registers (mean and 95% interval over seeds)", out)


def metric_panels(count: int) -> tuple[Any, Any]:
    """A grid of `count` metric panels, three to a row."""
    cols = min(3, count)
    rows = math.ceil(count / cols)
    return plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)


def title_panel(ax: Any, spec: cat.MetricSpec) -> None:
    arrow = "higher is better" if spec.higher_is_better else "lower is better"
    ax.set_title(f"{spec.label}\n({arrow})", fontsize=9)
    ax.grid(alpha=0.3)


def finish_panels(fig: Any, axes: Any, used: int, title: str, out: Path) -> Path:
    """Blank the unused panels, one legend, the title; saved to `out`."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, out)
