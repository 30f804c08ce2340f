"""The register-effect tables of the report: one row per register setting with every metric, and,
when the sweep varied where the registers enter, one grid per metric with the count down and the
depth across (registers.py computes the numbers; report.py writes the tables)."""

from __future__ import annotations

import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.registers import SETTING, depths_swept, with_groups


def _cell(n: int, mean: float, low: float, high: float) -> str:
    return f"{mean:.4g} (n=1)" if n < 2 else f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def _select(stats: pd.DataFrame, size: str, steps: int, objective: str | None) -> pd.DataFrame:
    sel = stats[(stats["model_size"] == size) & (stats["steps"] == steps)]
    return sel if objective is None else sel[sel["objective"] == objective]


def metric_table(stats: pd.DataFrame, size: str, steps: int, objective: str | None = None) -> pd.DataFrame:
    """One row per register setting, one column per metric: 'mean [low, high]' or 'mean (n=1)'.
    The first column names the objective; a register_depth column follows the count when the
    sweep placed registers later than the input."""
    stats = with_groups(stats)
    sel = _select(stats, size, steps, objective)
    objective = objective or (str(sel["objective"].iloc[0]) if not sel.empty else cat.DEFAULT_OBJECTIVE)
    table: dict[str, dict[tuple[int, int], str]] = {}
    for r in sel.itertuples():
        table.setdefault(r.metric, {})[(int(r.num_registers), int(r.register_depth))] = _cell(r.n, r.mean, r.ci_low, r.ci_high)
    columns = [m.short for m in cat.REGISTER_METRICS if m.short in table]
    frame = pd.DataFrame({c: table[c] for c in columns}).sort_index()
    frame.index.names = ["registers", "register_depth"]
    frame = frame.fillna("missing").reset_index()
    if not depths_swept(stats):
        frame = frame.drop(columns="register_depth")
    frame.insert(0, "objective", objective)
    return frame


def depth_grid(stats: pd.DataFrame, size: str, steps: int, metric: str, objective: str | None = None) -> pd.DataFrame:
    """One metric against (registers, depth): a row per register count, a column per entry block
    ('depth k'); the no-register row has its value under depth 0 only. Cells as in metric_table."""
    stats = with_groups(stats)
    sel = _select(stats, size, steps, objective)
    sel = sel[sel["metric"] == metric]
    depths = sorted(int(d) for d in sel["register_depth"].unique())
    rows: dict[int, dict[str, str]] = {}
    for r in sel.sort_values(SETTING).itertuples():
        rows.setdefault(int(r.num_registers), {})[f"depth {int(r.register_depth)}"] = _cell(r.n, r.mean, r.ci_low, r.ci_high)
    columns = [f"depth {d}" for d in depths]
    return pd.DataFrame(
        [{"registers": count, **{c: cells.get(c, "") for c in columns}} for count, cells in sorted(rows.items())],
        columns=["registers", *columns],
    )


def depth_grids(stats: pd.DataFrame, size: str, steps: int, objective: str | None = None) -> list[tuple[cat.MetricSpec, pd.DataFrame]]:
    """depth_grid for every register metric the setting logged, in the catalog's order; none
    when the sweep kept every register at the input."""
    stats = with_groups(stats)
    if not depths_swept(stats):
        return []
    sel = _select(stats, size, steps, objective)
    return [(spec, depth_grid(stats, size, steps, spec.short, objective)) for spec in cat.REGISTER_METRICS if spec.short in set(sel["metric"])]
