"""The effect of the number of registers: per objective and model size, each metric's mean and 95%
t-interval over seeds against the register count, the best count per metric, and a recommendation.

Recommendation rule (stated in the report): the smallest register count whose dense score is
within the 95% interval of the best count's and whose output outlier fraction is at most the
threshold; in every model size (of every objective) at once for the overall answer, and in every
size of one objective for that objective's answer. The dense score is the mIoU, or
val top-1 when no trial logged an mIoU. Each size is judged at its longest training length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
from scipy.special import stdtrit  # inverse Student t CDF; scipy.stats takes seconds to import

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.learning import LearningCheck
from orchestrator.analyze.load import Sweep

# group: the model size, or objective/size when the sweep crossed several objectives (figure rows, per_size keys).
STATS_COLUMNS = ["objective", "model_size", "group", "steps", "metric", "num_registers", "n", "mean", "ci_low", "ci_high"]


def register_stats(sweep: Sweep) -> pd.DataFrame:
    """Final value of each register metric per trial -> mean and 95% t-interval over seeds.

    With one seed the interval is undefined (NaN), not zero-width.
    """
    final = sweep.final_values()
    by_key = {m.key: m.short for m in cat.REGISTER_METRICS}
    final = final[final["key"].isin(by_key)].dropna(subset=["value"])
    if final.empty:
        return pd.DataFrame(columns=STATS_COLUMNS)
    trials = sweep.trials_frame()
    several = trials["objective"].nunique() > 1
    merged = final.assign(metric=final["key"].map(by_key)).merge(trials, on="run_id")
    rows = []
    keys = ["objective", "model_size", "steps", "metric", "num_registers"]
    for (objective, size, steps, metric, regs), group in merged.groupby(keys):
        values = group["value"].to_numpy(dtype=float)
        low, high = t_interval(values)
        label = cat.group_label(objective, size, several)
        rows.append((objective, size, label, int(steps), metric, int(regs), len(values), float(values.mean()), low, high))
    frame = pd.DataFrame(rows, columns=STATS_COLUMNS)
    metric_order = {m.short: i for i, m in enumerate(cat.REGISTER_METRICS)}
    order = {
        "_objective": frame["objective"].map(cat.objective_sort_key),
        "_size": frame["model_size"].map(cat.size_sort_key),
        "_metric": frame["metric"].map(metric_order),
    }
    ordered = frame.assign(**order).sort_values(["_objective", "_size", "steps", "_metric", "num_registers"])
    return ordered.drop(columns=list(order)).reset_index(drop=True)


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean = float(sum(values) / n)
    sd = float(pd.Series(values).std(ddof=1))
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


@dataclass(frozen=True)
class BestCount:
    model_size: str  # the group label: the size, or objective/size when several objectives were swept
    steps: int
    metric: str  # short name
    best: int
    mean: float
    clear: bool  # False with one seed or when another count's interval overlaps the best's
    tied_with: tuple[int, ...]  # counts whose interval overlaps the best's
    min_seeds: int
    objective: str = cat.DEFAULT_OBJECTIVE


def with_groups(stats: pd.DataFrame) -> pd.DataFrame:
    """Stats frames written without the objective columns (one objective) get them: supervised, group = size."""
    if "objective" not in stats:
        stats = stats.assign(objective=cat.DEFAULT_OBJECTIVE)
    if "group" not in stats:
        stats = stats.assign(group=stats["model_size"])
    return stats


def best_counts(stats: pd.DataFrame) -> list[BestCount]:
    """The best register count per (objective, size, length, metric), with whether the sweep can tell."""
    stats = with_groups(stats)
    result = []
    for (objective, size, steps, metric), group in stats.groupby(["objective", "group", "steps", "metric"], sort=False):
        spec = cat.METRICS_BY_SHORT[metric]
        group = group.sort_values("num_registers")
        # Ties go to the smaller count: fewer registers cost less.
        best_row = group.loc[(group["mean"] if spec.higher_is_better else -group["mean"]).idxmax()]
        others = group[group["num_registers"] != best_row["num_registers"]]
        tied = tuple(int(r.num_registers) for r in others.itertuples() if _overlap(best_row, r))
        min_seeds = int(group["n"].min())
        clear = min_seeds >= 2 and not tied
        result.append(
            BestCount(
                size, int(steps), metric, int(best_row["num_registers"]), float(best_row["mean"]), clear, tied,
                min_seeds, objective,
            )
        )
    return result


def _overlap(a, b) -> bool:
    if any(math.isnan(x) for x in (a.ci_low, a.ci_high, b.ci_low, b.ci_high)):
        return True  # undefined intervals cannot separate anything
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high


@dataclass
class Recommendation:
    num_registers: int | None
    metric: str  # short name of the dense score used
    rule: str
    can_tell: bool
    per_size: dict[str, int | None] = field(default_factory=dict)  # by group: size, or objective/size
    steps_used: dict[str, int] = field(default_factory=dict)  # training length judged per group
    per_objective: dict[str, int | None] = field(default_factory=dict)  # the rule within each objective's sizes
    verdict: list[str] = field(default_factory=list)  # sentences for the report
    missing: list[str] = field(default_factory=list)  # why there is no recommendation, and what would supply it
    evidence: list[str] = field(default_factory=list)  # the numbers behind a recommendation


def recommend(
    stats: pd.DataFrame,
    threshold: float,
    metric_for_best: str = "miou",
    learning: Sequence[LearningCheck] = (),
    sweep_command: str = "python -m orchestrator.sweep SPEC",
) -> Recommendation:
    """The rule's answer, or none: where a judged setting did not learn or has one seed, a
    number would be noise, so `missing` says what is lacking and which command supplies it."""
    rec = _apply_rule(stats, threshold, metric_for_best)
    if not rec.steps_used:
        return rec
    learned = {(c.group, c.steps): c for c in learning}
    for size, steps in rec.steps_used.items():
        check = learned.get((size, steps))
        if check is not None and check.learned is False:
            rec.missing.append(
                f"{size} at {steps} steps did not learn (val top-1 {check.top1_mean:.3f}, chance {check.chance:.3f}): "
                f"a register count chosen on untrained models means nothing. Train longer or on an easier task, "
                f"e.g. `{sweep_command} --set 'grid.steps=[{steps * 4}]' --launch longer`."
            )
    seeds = with_groups(stats)
    seeds = seeds[seeds["metric"] == rec.metric]
    judged = seeds[[rec.steps_used.get(group) == steps for group, steps in zip(seeds["group"], seeds["steps"])]]
    if not judged.empty and int(judged["n"].min()) < 2:
        rec.missing.append(
            "each setting has one seed, so no interval tells a real difference from noise between seeds. "
            f"Run more seeds: `{sweep_command} --set 'seeds=[0,1,2]' --launch seeds`, then analyse all launches "
            "together (leave out --parent-run)."
        )
    if rec.missing:
        rec.num_registers = None
        rec.can_tell = False
        rec.evidence = []
    return rec


def _apply_rule(stats: pd.DataFrame, threshold: float, metric_for_best: str) -> Recommendation:
    stats = with_groups(stats)
    dense = cat.metric_spec(metric_for_best).short
    verdict: list[str] = []
    if dense not in set(stats["metric"]):
        fallback = "top1"
        verdict.append(f"No trial logged {cat.METRICS_BY_SHORT[dense].key}; the rule falls back to {fallback}.")
        dense = fallback
    spec = cat.METRICS_BY_SHORT[dense]
    rule = (
        f"the smallest register count whose {spec.label} is within the 95% interval of the best count's "
        f"and whose output outlier fraction is at most {threshold:g}, in every model size "
        f"(each at its longest training length)"
    )
    sel = stats[stats["metric"] == dense]
    if sel.empty:
        verdict.append(f"No trial logged {spec.key} either: the sweep cannot recommend a register count.")
        return Recommendation(None, dense, rule, False, verdict=verdict)
    longest = sel.groupby("group")["steps"].max().to_dict()
    objective_of = dict(zip(sel["group"], sel["objective"]))
    ok_by_size: dict[str, set[int]] = {}
    per_size: dict[str, int | None] = {}
    can_tell = True
    for size in sorted(longest, key=cat.group_sort_key):
        steps = longest[size]
        group = stats[(stats["group"] == size) & (stats["steps"] == steps)]
        ok, sentences, clear = _judge_size(group, spec, threshold)
        can_tell &= clear
        verdict.extend(f"{size} ({steps} steps): {s}" for s in sentences)
        ok_by_size[size] = ok
        per_size[size] = min(ok) if ok else None
    common = set.intersection(*ok_by_size.values()) if ok_by_size else set()
    choice = min(common) if common else None
    per_objective: dict[str, int | None] = {}
    for objective in sorted(set(objective_of.values()), key=cat.objective_sort_key):
        mine = [ok for g, ok in ok_by_size.items() if objective_of[g] == objective]
        shared = set.intersection(*mine)
        per_objective[objective] = min(shared) if shared else None
    if choice is None:
        verdict.append("No register count meets the rule in every model size; see the per-size answers.")
    steps_used = {k: int(v) for k, v in longest.items()}
    evidence = _evidence(stats, choice, spec, steps_used) if choice is not None else []
    return Recommendation(
        choice, dense, rule, can_tell, per_size=per_size, steps_used=steps_used, verdict=verdict,
        per_objective=per_objective, evidence=evidence,
    )


def _evidence(stats: pd.DataFrame, choice: int, spec: cat.MetricSpec, steps_used: dict[str, int]) -> list[str]:
    """Per size: the chosen count's score and outliers beside the best count's score."""
    lines = []
    for size, steps in steps_used.items():
        cell = stats[(stats["group"] == size) & (stats["steps"] == steps)]
        dense = cell[cell["metric"] == spec.short].set_index("num_registers")
        if choice not in dense.index:
            continue
        best = best_counts(cell[cell["metric"] == spec.short])[0]
        chosen = dense.loc[choice]
        outliers = cell[cell["metric"] == "outlier_frac"].set_index("num_registers")["mean"]
        outlier_text = f", output outlier fraction {outliers[choice]:.3g}" if choice in outliers.index else ""
        lines.append(
            f"{size} ({steps} steps, {int(chosen['n'])} seeds): {choice} registers give {spec.label} {_with_interval(chosen)}"
            f"{outlier_text}; the best count, {best.best}, gives {_with_interval(dense.loc[best.best])}."
        )
    return lines


def _with_interval(row: pd.Series) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['mean']:.4g}"
    return f"{row['mean']:.4g} [95% interval {row['ci_low']:.4g} to {row['ci_high']:.4g}]"


def _judge_size(group: pd.DataFrame, spec: cat.MetricSpec, threshold: float) -> tuple[set[int], list[str], bool]:
    """Counts that meet the rule in one size, sentences explaining it, and whether the sweep can tell."""
    dense = group[group["metric"] == spec.short].sort_values("num_registers")
    if dense.empty:
        return set(), [f"no {spec.label} logged."], False
    best = best_counts(dense)[0]
    best_row = dense[dense["num_registers"] == best.best].iloc[0]
    sentences: list[str] = []
    if best.min_seeds < 2:
        sentences.append(
            f"the sweep cannot tell which register count is best: one seed per setting, so no confidence "
            f"interval (best single-run {spec.label}: {best.best} registers, {best.mean:.4g})."
        )
        bound = best_row["mean"]
    else:
        bound = best_row["ci_low"] if spec.higher_is_better else best_row["ci_high"]
        if best.tied_with:
            sentences.append(
                f"the sweep cannot tell {best.best} registers apart from {_join(best.tied_with)} on {spec.label}: "
                f"their 95% intervals overlap."
            )
        else:
            sentences.append(
                f"{best.best} registers give the best {spec.label} ({best.mean:.4g}, 95% interval "
                f"{best_row['ci_low']:.4g} to {best_row['ci_high']:.4g}), clear of every other count."
            )
    within = {
        int(r.num_registers)
        for r in dense.itertuples()
        if (r.mean >= bound if spec.higher_is_better else r.mean <= bound)
    }
    outliers = group[group["metric"] == "outlier_frac"].set_index("num_registers")["mean"]
    if outliers.empty:
        sentences.append("no output outlier fraction logged: the near-zero condition was not checked.")
        clean = within
    else:
        clean = {c for c in within if c not in outliers.index or outliers[c] <= threshold}
    return clean, sentences, best.clear


def _join(counts) -> str:
    return ", ".join(str(c) for c in counts)


def metric_table(stats: pd.DataFrame, size: str, steps: int, objective: str | None = None) -> pd.DataFrame:
    """One row per register count, one column per metric: 'mean [low, high]' or 'mean (1 seed)'.
    The first column names the objective."""
    stats = with_groups(stats)
    sel = stats[(stats["model_size"] == size) & (stats["steps"] == steps)]
    if objective is not None:
        sel = sel[sel["objective"] == objective]
    objective = objective or (str(sel["objective"].iloc[0]) if not sel.empty else cat.DEFAULT_OBJECTIVE)
    table: dict[str, dict[int, str]] = {}
    for r in sel.itertuples():
        cell = f"{r.mean:.4g} (n=1)" if r.n < 2 else f"{r.mean:.4g} [{r.ci_low:.4g}, {r.ci_high:.4g}]"
        table.setdefault(r.metric, {})[int(r.num_registers)] = cell
    columns = [m.short for m in cat.REGISTER_METRICS if m.short in table]
    frame = pd.DataFrame({c: table[c] for c in columns}).sort_index()
    frame.index.name = "registers"
    frame = frame.fillna("missing").reset_index()
    frame.insert(0, "objective", objective)
    return frame
