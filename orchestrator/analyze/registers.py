"""The effect of registers: per objective and model size, each metric's mean and 95% t-interval
over seeds against the register setting, the best setting per metric, and a recommendation.

A setting is the register count and the block before which the registers enter
(`model.register_depth`; 0 = at the input, as in the paper). Labels: `4` is 4 registers from the
input, `4@3` is 4 registers entering before block 3.

Recommendation rule (stated in the report): the smallest register count whose dense score is
within the 95% interval of the best count's and whose output outlier fraction is at most the
threshold; in every model size (of every objective) at once for the overall answer, and in every
size of one objective for that objective's answer. The dense score is the mIoU, or
val top-1 when no trial logged an mIoU. Each size is judged at its longest training length.
When the sweep varied the depth, the rule covers the pair: among the (count, depth) settings that
pass, the fewest registers, and for that count the latest entry (the registers then pass through
fewest blocks, which costs least); the rule's sentence in the report says so.
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
STATS_COLUMNS = [
    "objective", "model_size", "group", "steps", "metric", "num_registers", "register_depth", "n", "mean", "ci_low", "ci_high",
]
SETTING = ["num_registers", "register_depth"]  # what the register-effect tables and the rule compare
Setting = tuple[int, int]  # (num_registers, register_depth)


def setting_label(count: int, depth: int = 0) -> str:
    """'4' for 4 registers from the input; '4@3' for 4 registers entering before block 3."""
    return f"{count}@{depth}" if depth else str(count)


def cheapest(settings) -> Setting:
    """The fewest registers, then the latest entry: fewer register tokens through fewer blocks."""
    return min(settings, key=lambda s: (s[0], -s[1]))


def depths_swept(stats: pd.DataFrame) -> bool:
    """Whether any setting places registers later than the input: the analysis then shows depth as a second axis."""
    return "register_depth" in stats and bool((stats["register_depth"] != 0).any())


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
    keys = ["objective", "model_size", "steps", "metric", *SETTING]
    for (objective, size, steps, metric, regs, depth), group in merged.groupby(keys):
        values = group["value"].to_numpy(dtype=float)
        low, high = t_interval(values)
        label = cat.group_label(objective, size, several)
        rows.append(
            (objective, size, label, int(steps), metric, int(regs), int(depth), len(values), float(values.mean()), low, high)
        )
    frame = pd.DataFrame(rows, columns=STATS_COLUMNS)
    metric_order = {m.short: i for i, m in enumerate(cat.REGISTER_METRICS)}
    order = {
        "_objective": frame["objective"].map(cat.objective_sort_key),
        "_size": frame["model_size"].map(cat.size_sort_key),
        "_metric": frame["metric"].map(metric_order),
    }
    ordered = frame.assign(**order).sort_values(["_objective", "_size", "steps", "_metric", *SETTING])
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
    best: int  # register count of the best setting
    mean: float
    clear: bool  # False with one seed or when another setting's interval overlaps the best's
    tied_with: tuple[str, ...]  # labels (setting_label) of the settings whose interval overlaps the best's
    min_seeds: int
    objective: str = cat.DEFAULT_OBJECTIVE
    register_depth: int = 0  # entry block of the best setting

    @property
    def label(self) -> str:
        return setting_label(self.best, self.register_depth)


def with_groups(stats: pd.DataFrame) -> pd.DataFrame:
    """Stats frames written without the objective columns (one objective) get them: supervised, group = size;
    without the depth column (sweeps from before it), registers entered at the input: depth 0."""
    if "objective" not in stats:
        stats = stats.assign(objective=cat.DEFAULT_OBJECTIVE)
    if "group" not in stats:
        stats = stats.assign(group=stats["model_size"])
    if "register_depth" not in stats:
        stats = stats.assign(register_depth=0)
    return stats


def best_counts(stats: pd.DataFrame) -> list[BestCount]:
    """The best register setting per (objective, size, length, metric), with whether the sweep can tell."""
    stats = with_groups(stats)
    result = []
    for (objective, size, steps, metric), group in stats.groupby(["objective", "group", "steps", "metric"], sort=False):
        spec = cat.METRICS_BY_SHORT[metric]
        # Ties go to the smaller count, then the later entry: fewer register tokens in fewer blocks cost less.
        group = group.assign(_later=-group["register_depth"]).sort_values(["num_registers", "_later"])
        best_row = group.loc[(group["mean"] if spec.higher_is_better else -group["mean"]).idxmax()]
        best = (int(best_row["num_registers"]), int(best_row["register_depth"]))
        others = group[[(int(c), int(d)) != best for c, d in zip(group["num_registers"], group["register_depth"])]].sort_values(SETTING)
        tied = tuple(setting_label(int(r.num_registers), int(r.register_depth)) for r in others.itertuples() if _overlap(best_row, r))
        min_seeds = int(group["n"].min())
        clear = min_seeds >= 2 and not tied
        result.append(
            BestCount(size, int(steps), metric, best[0], float(best_row["mean"]), clear, tied, min_seeds, objective, best[1])
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
    register_depth: int | None = None  # entry block of the recommended setting (0: from the input)
    covers_depth: bool = False  # the sweep varied the depth: the rule chose a (count, depth) pair
    per_size_depth: dict[str, int | None] = field(default_factory=dict)  # entry block of each per_size answer
    per_objective_depth: dict[str, int | None] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        """'4' or '4@3' (4 registers entering before block 3); None without a recommendation."""
        return None if self.num_registers is None else setting_label(self.num_registers, self.register_depth or 0)

    def size_label(self, group: str) -> str:
        count = self.per_size.get(group)
        return "none" if count is None else setting_label(count, self.per_size_depth.get(group) or 0)

    def objective_label(self, objective: str) -> str:
        count = self.per_objective.get(objective)
        return "none" if count is None else setting_label(count, self.per_objective_depth.get(objective) or 0)


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
        rec.register_depth = None
        rec.can_tell = False
        rec.evidence = []
    return rec


def _rule(spec: cat.MetricSpec, threshold: float, covers_depth: bool) -> str:
    if not covers_depth:
        return (
            f"the smallest register count whose {spec.label} is within the 95% interval of the best count's "
            f"and whose output outlier fraction is at most {threshold:g}, in every model size "
            f"(each at its longest training length)"
        )
    return (
        f"over the pair (register count, register depth), the settings whose {spec.label} is within the 95% interval "
        f"of the best setting's and whose output outlier fraction is at most {threshold:g}, in every model size "
        f"(each at its longest training length); of those the fewest registers, and for that count the latest entry "
        f"block, which puts the fewest register tokens through the blocks (`N@k`: N registers entering before block k; "
        f"a plain N enters at the input)"
    )


def _apply_rule(stats: pd.DataFrame, threshold: float, metric_for_best: str) -> Recommendation:
    stats = with_groups(stats)
    covers_depth = depths_swept(stats)
    dense = cat.metric_spec(metric_for_best).short
    verdict: list[str] = []
    if dense not in set(stats["metric"]):
        fallback = "top1"
        verdict.append(f"No trial logged {cat.METRICS_BY_SHORT[dense].key}; the rule falls back to {fallback}.")
        dense = fallback
    spec = cat.METRICS_BY_SHORT[dense]
    rule = _rule(spec, threshold, covers_depth)
    sel = stats[stats["metric"] == dense]
    if sel.empty:
        verdict.append(f"No trial logged {spec.key} either: the sweep cannot recommend a register count.")
        return Recommendation(None, dense, rule, False, verdict=verdict, covers_depth=covers_depth)
    longest = sel.groupby("group")["steps"].max().to_dict()
    objective_of = dict(zip(sel["group"], sel["objective"]))
    ok_by_size: dict[str, set[Setting]] = {}
    per_size: dict[str, Setting | None] = {}
    can_tell = True
    for size in sorted(longest, key=cat.group_sort_key):
        steps = longest[size]
        group = stats[(stats["group"] == size) & (stats["steps"] == steps)]
        ok, sentences, clear = _judge_size(group, spec, threshold, covers_depth)
        can_tell &= clear
        verdict.extend(f"{size} ({steps} steps): {s}" for s in sentences)
        ok_by_size[size] = ok
        per_size[size] = cheapest(ok) if ok else None
    common = set.intersection(*ok_by_size.values()) if ok_by_size else set()
    choice = cheapest(common) if common else None
    per_objective: dict[str, Setting | None] = {}
    for objective in sorted(set(objective_of.values()), key=cat.objective_sort_key):
        mine = [ok for g, ok in ok_by_size.items() if objective_of[g] == objective]
        shared = set.intersection(*mine)
        per_objective[objective] = cheapest(shared) if shared else None
    if choice is None:
        what = "setting (count, depth)" if covers_depth else "register count"
        verdict.append(f"No {what} meets the rule in every model size; see the per-size answers.")
    steps_used = {k: int(v) for k, v in longest.items()}
    evidence = _evidence(stats, choice, spec, steps_used, covers_depth) if choice is not None else []
    return Recommendation(
        choice[0] if choice else None, dense, rule, can_tell,
        per_size={k: v[0] if v else None for k, v in per_size.items()}, steps_used=steps_used, verdict=verdict,
        per_objective={k: v[0] if v else None for k, v in per_objective.items()}, evidence=evidence,
        register_depth=choice[1] if choice else None, covers_depth=covers_depth,
        per_size_depth={k: v[1] if v else None for k, v in per_size.items()},
        per_objective_depth={k: v[1] if v else None for k, v in per_objective.items()},
    )


def _by_setting(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index(SETTING)


def _evidence(
    stats: pd.DataFrame, choice: Setting, spec: cat.MetricSpec, steps_used: dict[str, int], covers_depth: bool
) -> list[str]:
    """Per size: the chosen setting's score and outliers beside the best setting's score."""
    lines = []
    what = "setting" if covers_depth else "count"
    for size, steps in steps_used.items():
        cell = stats[(stats["group"] == size) & (stats["steps"] == steps)]
        dense = _by_setting(cell[cell["metric"] == spec.short])
        if choice not in dense.index:
            continue
        best = best_counts(cell[cell["metric"] == spec.short])[0]
        chosen = dense.loc[choice]
        outliers = _by_setting(cell[cell["metric"] == "outlier_frac"])["mean"]
        outlier_text = f", output outlier fraction {outliers[choice]:.3g}" if choice in outliers.index else ""
        lines.append(
            f"{size} ({steps} steps, {int(chosen['n'])} seeds): {setting_label(*choice)} registers give {spec.label} "
            f"{_with_interval(chosen)}{outlier_text}; the best {what}, {best.label}, gives "
            f"{_with_interval(dense.loc[(best.best, best.register_depth)])}."
        )
    return lines


def _with_interval(row: pd.Series) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['mean']:.4g}"
    return f"{row['mean']:.4g} [95% interval {row['ci_low']:.4g} to {row['ci_high']:.4g}]"


def _judge_size(
    group: pd.DataFrame, spec: cat.MetricSpec, threshold: float, covers_depth: bool = False
) -> tuple[set[Setting], list[str], bool]:
    """Settings that meet the rule in one size, sentences explaining it, and whether the sweep can tell."""
    dense = group[group["metric"] == spec.short].sort_values(SETTING)
    what = "setting" if covers_depth else "register count"
    if dense.empty:
        return set(), [f"no {spec.label} logged."], False
    best = best_counts(dense)[0]
    best_row = _by_setting(dense).loc[(best.best, best.register_depth)]
    sentences: list[str] = []
    if best.min_seeds < 2:
        sentences.append(
            f"the sweep cannot tell which {what} is best: one seed per setting, so no confidence "
            f"interval (best single-run {spec.label}: {best.label} registers, {best.mean:.4g})."
        )
        bound = best_row["mean"]
    else:
        bound = best_row["ci_low"] if spec.higher_is_better else best_row["ci_high"]
        if best.tied_with:
            sentences.append(
                f"the sweep cannot tell {best.label} registers apart from {_join(best.tied_with)} on {spec.label}: "
                f"their 95% intervals overlap."
            )
        else:
            other = "setting" if covers_depth else "count"
            sentences.append(
                f"{best.label} registers give the best {spec.label} ({best.mean:.4g}, 95% interval "
                f"{best_row['ci_low']:.4g} to {best_row['ci_high']:.4g}), clear of every other {other}."
            )
    within = {
        (int(r.num_registers), int(r.register_depth))
        for r in dense.itertuples()
        if (r.mean >= bound if spec.higher_is_better else r.mean <= bound)
    }
    outliers = _by_setting(group[group["metric"] == "outlier_frac"])["mean"]
    if outliers.empty:
        sentences.append("no output outlier fraction logged: the near-zero condition was not checked.")
        clean = within
    else:
        clean = {c for c in within if c not in outliers.index or outliers[c] <= threshold}
    return clean, sentences, best.clear


def _join(counts) -> str:
    return ", ".join(str(c) for c in counts)
