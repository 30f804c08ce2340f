"""The written results: CSV tables, summary.json, and report.md (findings in sentences with the
numbers, tables, relative links to the figures, caveats)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze import test_time
from orchestrator.analyze.emergence import emergence_table
from orchestrator.analyze.learning import RULE as LEARNING_RULE
from orchestrator.analyze.learning import learning_table
from orchestrator.analyze.register_tables import depth_grids, metric_table
from orchestrator.analyze.result import AnalysisResult

FIGURE_TITLES = {
    "emergence_progress": "Outlier fraction against training progress and model size",
    "register_effect": "Metrics against the number of registers (paper Fig. 8)",
    "register_depth_effect": "Metrics against the block where the registers enter, per register count",
    "norm_hist_output": "Output norm histogram without and with registers (paper Fig. 3, 7)",
    "norm_distributions": "Norm distribution against block, training step and model size (paper Fig. 4 a-c)",
    "attention_maps": "CLS-token and register attention maps (paper Fig. 1, 9)",
}


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def best_table(result: AnalysisResult) -> pd.DataFrame:
    rows = [
        {
            "objective": b.objective,
            "model_size": b.model_size.rpartition("/")[2],
            "steps": b.steps,
            "metric": b.metric,
            "direction": "higher" if cat.METRICS_BY_SHORT[b.metric].higher_is_better else "lower",
            "best_num_registers": b.best,
            "best_register_depth": b.register_depth,
            "mean": round(b.mean, 4),
            "seeds": b.min_seeds,
            "clear": "yes" if b.clear else ("no (one seed)" if b.min_seeds < 2 else "no (overlaps " + ", ".join(map(str, b.tied_with)) + ")"),
        }
        for b in result.best
    ]
    columns = ["objective", "model_size", "steps", "metric", "direction", "best_num_registers", "best_register_depth", "mean", "seeds", "clear"]
    frame = pd.DataFrame(rows, columns=columns)
    # The depth column only where the sweep placed registers later than the input.
    return frame if result.recommendation.covers_depth else frame.drop(columns="best_register_depth")


def skipped_table(result: AnalysisResult) -> pd.DataFrame:
    columns = ["run_id", "trial_id", "status", "objective", "axes", "reason"]
    rows = [
        {"run_id": s.run_id, "trial_id": s.trial_id, "status": s.status, "objective": s.objective, "axes": s.axes, "reason": s.reason}
        for s in result.sweep.skipped
    ]
    return pd.DataFrame(rows, columns=columns)


def write_outputs(result: AnalysisResult) -> Path:
    """Write every table, summary.json and report.md into result.out_dir; returns the report path."""
    out = result.out_dir
    emergence = emergence_table(result.emergence)
    emergence.to_csv(out / "emergence.csv", index=False)
    (out / "emergence.md").write_text(markdown_table(emergence) + "\n")
    result.stats.to_csv(out / "register_effect.csv", index=False)
    best_table(result).to_csv(out / "best_registers.csv", index=False)
    skipped_table(result).to_csv(out / "skipped_runs.csv", index=False)
    learning_table(result.learning).to_csv(out / "learning.csv", index=False)
    if result.test_time is not None:
        test_time.write_outputs(result.test_time, out)
    (out / "summary.json").write_text(json.dumps(summary(result), indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(render_report(result, emergence))
    return report


def summary(result: AnalysisResult) -> dict:
    rec = result.recommendation
    return {
        "experiment": result.sweep.experiment_name,
        "tracking_uri": result.sweep.tracking_uri,
        "threshold": result.threshold,
        "trials": len(result.sweep.trials),
        "skipped": [asdict(s) for s in result.sweep.skipped],
        "sizes_with_artifacts": result.sizes_with_artifacts,
        "emergence": [asdict(p) for p in result.emergence],
        "best": [asdict(b) for b in result.best],
        "recommendation": {
            "num_registers": rec.num_registers,
            "register_depth": rec.register_depth,
            "covers_depth": rec.covers_depth,
            "metric": rec.metric,
            "rule": rec.rule,
            "can_tell": rec.can_tell,
            "per_size": rec.per_size,
            "per_objective": rec.per_objective,
            "per_size_depth": rec.per_size_depth,
            "per_objective_depth": rec.per_objective_depth,
            "steps_used": rec.steps_used,
            "missing": rec.missing,
            "evidence": rec.evidence,
        },
        "learning": [
            {"model_size": c.model_size, "steps": c.steps, "trials": c.trials, "num_classes": c.num_classes,
             "chance": c.chance, "top1_mean": c.top1_mean, "top1_min": c.top1_min, "margin": c.margin, "learned": c.learned}
            for c in result.learning
        ],
        "figures": {name: str(path.relative_to(result.out_dir)) for name, path in result.figures.items()},
        "caveats": result.caveats,
    }


def _join(items: Sequence[object]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else "none"


def render_report(result: AnalysisResult, emergence: pd.DataFrame) -> str:
    sweep, rec, thr = result.sweep, result.recommendation, result.threshold
    trials = sweep.watched_frame()  # what the sweep covers, trials stopped early included
    seeds = trials.groupby(["objective", "model_size", "num_registers", "register_depth", "steps"])["seed"].nunique()
    objectives = sorted(trials["objective"].unique(), key=cat.objective_sort_key)
    depths = sorted(trials["register_depth"].unique())
    lines = [
        f"# Sweep analysis: {sweep.experiment_name}",
        "",
        f"Tracking store `{sweep.tracking_uri}`, experiment id {sweep.experiment_id}"
        + (f", parent run `{result.parent_run}`" if result.parent_run else "")
        + f". {len(sweep.trials)} finished trials analysed, {len(sweep.skipped)} runs skipped"
        + (f" ({len(sweep.stopped)} of them stopped early: in the emergence map only)." if sweep.stopped else "."),
        f"Objectives: {_join(objectives)}; "
        f"model sizes: {_join(sorted(trials['model_size'].unique(), key=cat.size_sort_key))}; "
        f"register counts: {_join(sorted(trials['num_registers'].unique()))}; "
        + (f"register depths (the block the registers enter before): {_join(depths)}; " if depths != [0] else "")
        + f"training lengths: {_join(sorted(trials['steps'].unique()))} steps; "
        f"seeds per setting: {seeds.min()}" + (f" to {seeds.max()}" if seeds.max() != seeds.min() else "") + ".",
        f"An artifact is a patch token the scale-free detector flags as a high-norm outlier "
        f"(`{cat.OUTLIER_PREFIX}<location>`); artifacts are present where that fraction exceeds {thr:g}.",
        "",
        "## Findings",
        "",
        *_findings(result),
        "",
        "## Did the models learn?",
        "",
        f"Val top-1 at the end of training beside chance, per model size and training length. Rule: {LEARNING_RULE}.",
        "",
        markdown_table(learning_table(result.learning)) if result.learning else "No trial logged val top-1.",
        "",
        "## Emergence of artifacts (trials without registers)",
        "",
        "Per objective: each family (supervised, DINO self-distillation, CLIP) is mapped on its own.",
        "",
        "Emergence step, where the trials watched for it as they trained (`when_from`: trial tags): the median over "
        "the seeds whose artifacts emerged of their `emerged_at_step`, the first of K consecutive flagged probes "
        "(docs/probes.md, Emergence), when at least half of the seeds' did. Otherwise (probe histories): the first "
        f"probe step from which the output outlier fraction (mean over seeds) stays above {thr:g} for every later "
        "step. Emergence block: at the last probe step, the first block from which every deeper block is above the "
        "threshold. `none`: it never does.",
        "",
        markdown_table(emergence) if not emergence.empty else "No trial without registers: nothing to map.",
        "",
        *_figure_links(result, lambda name: name.startswith("emergence")),
        "## Effect of registers",
        "",
        f"Final value of each metric, mean and [95% t-interval] over seeds; `(n=1)`: one seed, interval undefined. "
        f"Recommendation rule: {rec.rule}.",
        "",
    ]
    if rec.covers_depth:
        lines += [
            "The sweep placed registers at several depths: each setting is a register count and the block before "
            "which the registers enter (`register_depth`, 0 = at the input). Below each table, one grid per metric "
            "with the count down and the depth across.",
            "",
        ]
    for objective, size, steps in _size_lengths(result.stats):
        table = metric_table(result.stats, size, steps, objective)
        lines += [f"### {objective}, {size}, {steps} training steps", "", markdown_table(table), ""]
        for spec, grid in depth_grids(result.stats, size, steps, objective):
            lines += [f"{spec.label}, against (registers, depth):", "", markdown_table(grid), ""]
    if result.stats.empty:
        lines += ["No register metrics were logged.", ""]
    best = best_table(result)
    what = "setting (count, depth)" if rec.covers_depth else "count"
    lines += [f"### Best register {what} per objective, size and metric", "", markdown_table(best) if not best.empty else "none", ""]
    lines += _figure_links(result, lambda name: name in ("register_effect", "register_depth_effect"))
    lines += _test_time_lines(result)
    lines += ["## Norms and attention (probe artifacts)", ""]
    lines += _figure_links(result, lambda name: name in ("norm_hist_output", "norm_distributions", "attention_maps"))
    lines += ["## Caveats", ""] + [f"- {c}" for c in result.caveats or ["none"]] + [""]
    skipped = skipped_table(result)
    if not skipped.empty:
        lines += ["### Skipped runs", "", markdown_table(skipped), ""]
    return "\n".join(lines)


def _test_time_lines(result: AnalysisResult) -> list[str]:
    if result.test_time is None:
        return []
    lines = ["## Test-time registers beside trained registers", "", test_time.INTRO, ""]
    for heading, table in test_time.report_tables(result.stats, result.test_time):
        lines += [f"### {heading}", "", markdown_table(table), ""]
    return lines or ["No trial without registers: nothing to compare.", ""]


def _findings(result: AnalysisResult) -> list[str]:
    rec, thr = result.recommendation, result.threshold
    lines: list[str] = []
    emerged = result.sizes_with_artifacts
    clean = sorted(
        {result.point_label(p) for p in result.emergence if p.status == "none"} - set(emerged), key=cat.group_sort_key
    )
    judged = [p for p in result.emergence if p.status != "missing"]
    if result.emergence and not judged:
        lines.append("- No trial without registers logged outlier fractions: the emergence of artifacts cannot be judged.")
    elif judged and not emerged:
        lines.append(f"- No model size showed artifacts (output outlier fraction above {thr:g}, staying above): {_join(clean)}.")
    elif judged:
        lines.append(
            f"- Artifacts (output outlier fraction above {thr:g}, staying above) appeared in: {_join(emerged)}. "
            f"No artifacts in: {_join(clean)}."
        )
    for p in result.emergence:
        name = p.model_size if p.objective == cat.DEFAULT_OBJECTIVE else f"{p.objective} {p.model_size}"
        if p.status == "emerged":
            where = f"from block {p.block} on to the output" if p.block is not None else "at the output only"
            lines.append(
                f"- {name}, {p.steps} steps: artifacts emerged at step {p.step} ({p.fraction:.0%} of training) "
                f"and stayed; at the last probe step they appear {where}. Final output outlier fraction "
                f"{p.final_output_frac:.3g} ({p.n_seeds} seed{'s' if p.n_seeds != 1 else ''})."
            )
        elif p.status == "none":
            lines.append(
                f"- {name}, {p.steps} steps: no artifacts (final output outlier fraction {p.final_output_frac:.3g})."
            )
        else:
            lines.append(f"- {name}, {p.steps} steps: no outlier-fraction metrics were logged.")
    lines += [f"- {check.sentence()}" for check in result.learning]
    metric = cat.METRICS_BY_SHORT[rec.metric]
    if rec.missing:
        lines.append("- **No recommendation.** The data cannot support one yet:")
        lines += [f"  - {reason}" for reason in rec.missing]
        return lines
    if rec.num_registers is not None:
        per_size = ", ".join(f"{s}: {rec.size_label(s)}" for s in rec.per_size)
        if rec.covers_depth:
            where = "at the input" if not rec.register_depth else f"before block {rec.register_depth}"
            lines.append(
                f"- **Recommended registers: {rec.num_registers}, entering {where} ({rec.label})** "
                f"(by {metric.label}, over register count and depth; per size: {per_size})."
            )
        else:
            lines.append(f"- **Recommended number of registers: {rec.num_registers}** (by {metric.label}; per size: {per_size}).")
        lines.append(f"  - Rule: {rec.rule}.")
        lines += [f"  - Evidence, {sentence}" for sentence in rec.evidence]
    else:
        what = "register setting (count, depth)" if rec.covers_depth else "register count"
        lines.append(f"- **No {what} can be recommended** by the rule below.")
    if len(rec.per_objective) > 1:
        per_objective = ", ".join(f"{o}: {rec.objective_label(o)}" for o in rec.per_objective)
        lines.append(f"- Per objective (the rule within each objective's sizes): {per_objective}.")
    if not rec.can_tell:
        what = "register setting" if rec.covers_depth else "register count"
        lines.append(f"- The sweep cannot tell the best {what} with confidence: see the sentences below.")
    lines += [f"- {sentence}" for sentence in rec.verdict]
    return lines


def _size_lengths(stats: pd.DataFrame) -> list[tuple[str, str, int]]:
    groups = {(r.objective, r.model_size, int(r.steps)) for r in stats.itertuples()}
    return sorted(groups, key=lambda g: (cat.objective_sort_key(g[0]), cat.size_sort_key(g[1]), g[2]))


def _depth_title(name: str) -> str:
    size = name.removeprefix("emergence_depth_").replace("-", " ")
    return f"Outlier fraction by block and training step, {size}, no registers"


def _figure_links(result: AnalysisResult, wanted) -> list[str]:
    lines = []
    for name, path in result.figures.items():
        if wanted(name):
            title = FIGURE_TITLES.get(name) or _depth_title(name)
            rel = path.relative_to(result.out_dir).as_posix()
            lines += [f"![{title}]({rel})", ""]
    return lines
