"""The register-depth figure: each register metric against the block where the registers enter
(`model.register_depth`), one line per model size and register count, the same size without
registers as a dotted level. Drawn only when the sweep placed registers later than the input."""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.analyze import catalog as cat  # noqa: E402
from orchestrator.analyze.figures import finish_panels, metric_panels, title_panel  # noqa: E402
from orchestrator.analyze.registers import depths_swept, with_groups  # noqa: E402

LINE_STYLES = ("-", "--", "-.", ":")


def register_depth_figure(stats: pd.DataFrame, steps_used: dict[str, int], out: Path) -> Path | None:
    """Metrics against the entry block, mean and 95% interval over seeds (None: nothing to draw)."""
    stats = with_groups(stats)
    if stats.empty or not depths_swept(stats):
        return None
    metrics = [m for m in cat.REGISTER_METRICS if m.short in set(stats["metric"])]
    depths = sorted(int(d) for d in stats["register_depth"].unique())
    fig, axes = metric_panels(len(metrics))
    groups = sorted(stats["group"].unique(), key=cat.group_sort_key)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, spec in zip(axes.flat, metrics):
        for group, colour in zip(groups, cycle(colours)):
            steps = steps_used.get(group, stats[stats["group"] == group]["steps"].max())
            sel = stats[(stats["group"] == group) & (stats["steps"] == steps) & (stats["metric"] == spec.short)]
            counts = sorted(int(c) for c in sel["num_registers"].unique() if c > 0)
            for count, style in zip(counts, cycle(LINE_STYLES)):
                line = sel[sel["num_registers"] == count].sort_values("register_depth")
                low = (line["mean"] - line["ci_low"]).fillna(0).clip(lower=0)
                high = (line["ci_high"] - line["mean"]).fillna(0).clip(lower=0)
                ax.errorbar(
                    line["register_depth"], line["mean"], yerr=[low, high], marker="o", capsize=3, color=colour,
                    linestyle=style, label=f"{group} ({steps} steps), {count} registers",
                )
            none = sel[sel["num_registers"] == 0]
            if not none.empty:
                ax.axhline(float(none["mean"].iloc[0]), color=colour, linestyle=":", linewidth=1, label=f"{group}, no registers")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("register depth (block the registers enter before; 0 = input)")
        title_panel(ax, spec)
    title = "Metrics against where the registers enter (mean and 95% interval over seeds)"
    return finish_panels(fig, axes, len(metrics), title, out)
