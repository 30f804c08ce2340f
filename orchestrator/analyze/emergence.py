"""When and where artifact tokens emerge, from trials without registers, per objective and size.

When: each trial's own emergence watch (trainers/emergence/) tags its run as it trains with
`emergence.status` and, once artifacts have emerged, `emerged_at_step` (the first of K consecutive
flagged probes, pinned to every/8 steps with adaptive probing). A setting's artifacts emerged when
at least half of its watched seeds' did; its step is the median of theirs.

Runs without those tags (older stores, probe.monitor off) fall back to the histories: the
fraction of patch tokens the scale-free detector flags (probe/outlier_frac/<location>), averaged
over seeds, crossing the analysis threshold and staying above it for all later probe steps.

Where, for both: at the last probe step, the first block from which every deeper block's seed-mean
outlier fraction is above the threshold. A fraction that rises and falls back is no emergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.load import Sweep

OUTPUT = "output"


@dataclass(frozen=True)
class EmergencePoint:
    model_size: str
    steps: int  # training length
    n_seeds: int
    status: str  # 'emerged' | 'none' | 'missing' (no outlier-fraction metrics logged)
    step: int | None  # first probe step from which the fraction stays above the threshold
    fraction: float | None  # step / training length
    block: int | None  # first block from which (to the output) it stays above, at the last probe step
    final_output_frac: float | None  # at the last probe step
    objective: str = cat.DEFAULT_OBJECTIVE
    source: str = "histories"  # 'tags': the trials' own emergence watch; 'histories': the analysis threshold
    seeds_emerged: int | None = None  # tags only: how many of the watched seeds' artifacts emerged
    seeds_watched: int | None = None


def outlier_points(sweep: Sweep) -> pd.DataFrame:
    """Outlier fractions of no-register trials, averaged over seeds.

    Columns: objective, model_size, group (figure row: the size, or objective/size when several
    objectives were swept), steps, location, block (NaN for output), step, fraction (of training),
    value, n_seeds.
    """
    trials = sweep.watched_frame()
    several = trials["objective"].nunique() > 1 if not trials.empty else False
    trials = trials[trials["num_registers"] == 0]
    history = sweep.history.assign(location=sweep.history["key"].map(cat.outlier_location))
    history = history.dropna(subset=["location", "value"])
    columns = ["objective", "model_size", "group", "steps", "location", "block", "step", "fraction", "value", "n_seeds"]
    if trials.empty or history.empty:
        return pd.DataFrame(columns=columns)
    merged = history.merge(trials[["run_id", "objective", "model_size", "steps"]], on="run_id")
    grouped = merged.groupby(["objective", "model_size", "steps", "location", "step"], as_index=False).agg(
        value=("value", "mean"), n_seeds=("run_id", "nunique")
    )
    grouped["block"] = grouped["location"].map(cat.block_index).astype(float)
    grouped["fraction"] = grouped["step"] / grouped["steps"]
    grouped["group"] = [cat.group_label(o, m, several) for o, m in zip(grouped["objective"], grouped["model_size"])]
    return grouped[columns]


def first_sustained_crossing(values: Sequence[float], threshold: float) -> int | None:
    """Index from which every value is above `threshold`; None if the last value is not above it."""
    start: int | None = None
    for index, value in enumerate(values):
        if value > threshold:
            start = index if start is None else start
        else:
            start = None
    return start


def emergence_points(sweep: Sweep, threshold: float) -> list[EmergencePoint]:
    """One point per (objective, model size, training length) with no-register trials, in table order."""
    points = outlier_points(sweep)
    trials = sweep.watched_frame()
    trials = trials[trials["num_registers"] == 0]
    result: list[EmergencePoint] = []
    groups = sorted(
        {(r.objective, r.model_size, r.steps) for r in trials.itertuples()},
        key=lambda g: (cat.objective_sort_key(g[0]), cat.size_sort_key(g[1]), g[2]),
    )
    for objective, size, steps in groups:
        mine = (trials["objective"] == objective) & (trials["model_size"] == size) & (trials["steps"] == steps)
        n_seeds = int(trials[mine]["seed"].nunique())
        sel = (points["objective"] == objective) & (points["model_size"] == size) & (points["steps"] == steps)
        point = _point(objective, size, steps, n_seeds, points[sel], threshold)
        result.append(_from_tags(point, trials[mine]))
    return result


def _from_tags(point: EmergencePoint, trials: pd.DataFrame) -> EmergencePoint:
    """The point with its 'when' read from the trials' emergence tags, if any of them watched."""
    if "emergence_status" not in trials:
        return point
    watched = trials[trials["emergence_status"].notna()]
    if watched.empty:
        return point
    steps = sorted(int(s) for s in watched["emerged_at_step"].dropna())
    emerged = 2 * len(steps) >= len(watched)
    step = int(np.median(steps)) if emerged else None
    return replace(
        point,
        status="emerged" if emerged else "none",
        step=step,
        fraction=round(step / point.steps, 4) if step is not None else None,
        source="tags",
        seeds_emerged=len(steps),
        seeds_watched=len(watched),
    )


def _point(objective: str, size: str, steps: int, n_seeds: int, group: pd.DataFrame, threshold: float) -> EmergencePoint:
    if group.empty:
        return EmergencePoint(size, steps, n_seeds, "missing", None, None, None, None, objective)
    # When: the output's fraction over probe steps (the deepest block when no output is logged).
    over_time = group[group["location"] == OUTPUT]
    if over_time.empty:
        over_time = group[group["block"] == group["block"].max()]
    over_time = over_time.sort_values("step")
    start = first_sustained_crossing(over_time["value"].tolist(), threshold)
    step = int(over_time["step"].iloc[start]) if start is not None else None
    # Where: the blocks at the last probe step, shallow to deep.
    blocks = group.dropna(subset=["block"])
    block: int | None = None
    if not blocks.empty:
        last = blocks[blocks["step"] == blocks["step"].max()].sort_values("block")
        first = first_sustained_crossing(last["value"].tolist(), threshold)
        block = int(last["block"].iloc[first]) if first is not None else None
    return EmergencePoint(
        model_size=size,
        steps=steps,
        n_seeds=n_seeds,
        status="emerged" if step is not None else "none",
        step=step,
        fraction=round(step / steps, 4) if step is not None else None,
        block=block,
        final_output_frac=float(over_time["value"].iloc[-1]),
        objective=objective,
    )


def progress_grid(points: pd.DataFrame, steps: int) -> pd.DataFrame:
    """Output outlier fraction: rows = groups (model sizes, per objective when several; table order),
    columns = fraction of training."""
    sel = points[(points["steps"] == steps) & (points["location"] == OUTPUT)]
    if sel.empty:  # no output key logged: use each group's deepest block
        sel = points[points["steps"] == steps]
        sel = sel[sel["block"] == sel.groupby("group")["block"].transform("max")]
    grid = sel.assign(fraction=sel["fraction"].round(3)).pivot_table(
        index="group", columns="fraction", values="value", aggfunc="mean"
    )
    return grid.reindex(sorted(grid.index, key=cat.group_sort_key))


def depth_grid(points: pd.DataFrame, group: str, steps: int) -> pd.DataFrame:
    """Outlier fraction of one group (a size, or objective/size): rows = blocks (shallow first,
    output last), columns = probe steps."""
    sel = points[(points["group"] == group) & (points["steps"] == steps)]
    grid = sel.pivot_table(index="location", columns="step", values="value", aggfunc="mean")
    order = sorted(grid.index, key=lambda loc: (cat.block_index(loc) is None, cat.block_index(loc) or 0))
    return grid.reindex(order)


def emergence_table(points: list[EmergencePoint]) -> pd.DataFrame:
    """The table written to CSV and Markdown; 'none' where artifacts never emerged."""
    rows = []
    for p in points:
        absent = "n/a" if p.status == "missing" else "none"
        rows.append(
            {
                "objective": p.objective,
                "model_size": p.model_size,
                "steps": p.steps,
                "seeds": p.n_seeds,
                "artifacts": {"emerged": "yes", "none": "no", "missing": "no data"}[p.status],
                "emergence_step": p.step if p.step is not None else absent,
                "emergence_fraction": f"{p.fraction:g}" if p.fraction is not None else absent,
                "emergence_block": p.block if p.block is not None else absent,
                "final_output_outlier_frac": round(p.final_output_frac, 4) if p.final_output_frac is not None else np.nan,
                "seeds_emerged": f"{p.seeds_emerged}/{p.seeds_watched}" if p.source == "tags" else "n/a",
                "when_from": "trial tags" if p.source == "tags" else "probe histories",
            }
        )
    return pd.DataFrame(rows)
