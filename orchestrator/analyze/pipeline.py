"""The analysis end to end: load the sweep, map emergence, judge registers, draw, write, log."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.artifacts import ArtifactReader
from orchestrator.analyze.emergence import (
    emergence_points,
    outlier_points,
)
from orchestrator.analyze.learning import learning_checks
from orchestrator.analyze.figures import (
    emergence_depth_figure,
    emergence_progress_figure,
    register_effect_figure,
)
from orchestrator.analyze.load import Sweep, load_sweep
from orchestrator.analyze.probe_figures import probe_figures
from orchestrator.analyze.publish import log_analysis_run
from orchestrator.analyze.register_figures import register_depth_figure
from orchestrator.analyze.registers import (
    best_counts,
    recommend,
    register_stats,
    setting_label,
)
from orchestrator.analyze.report import write_outputs
from orchestrator.analyze.result import AnalysisResult
from orchestrator.analyze.test_time import compare_trials


def run_analysis(
    experiment: str,
    out_dir: Path | str,
    *,
    tracking_uri: str | None = None,
    parent_run: str | None = None,
    threshold: float = 0.01,
    metric_for_best: str = "miou",
    log_to_mlflow: bool = True,
    test_time_registers: bool = True,
) -> AnalysisResult:
    """Analyse the finished trials of `experiment`, write the results to `out_dir`, and
    (unless log_to_mlflow is False) log them as an `analysis` run in the same experiment."""
    cat.metric_spec(metric_for_best)  # fail on a typo before any work
    sweep = load_sweep(experiment, tracking_uri, parent_run)
    return analyse_sweep(sweep, out_dir, parent_run=parent_run, threshold=threshold,
                         metric_for_best=metric_for_best, log_to_mlflow=log_to_mlflow,
                         test_time_registers=test_time_registers)


def analyse_sweep(
    sweep: Sweep,
    out_dir: Path | str,
    *,
    parent_run: str | None = None,
    threshold: float = 0.01,
    metric_for_best: str = "miou",
    log_to_mlflow: bool = True,
    test_time_registers: bool = True,
) -> AnalysisResult:
    """The analysis of an already loaded sweep (see run_analysis). test_time_registers: load every
    no-register trial's final checkpoint and measure it with a test-time register (analyze/test_time.py)."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    points = outlier_points(sweep)
    stats = register_stats(sweep)
    learning = learning_checks(sweep)
    result = AnalysisResult(
        sweep=sweep,
        out_dir=out,
        threshold=threshold,
        parent_run=parent_run,
        emergence=emergence_points(sweep, threshold),
        stats=stats,
        best=best_counts(stats),
        recommendation=recommend(stats, threshold, metric_for_best, learning, sweep_command(sweep)),
        learning=learning,
    )
    result.caveats = data_caveats(sweep, stats)
    if test_time_registers:
        result.test_time = compare_trials(sweep)
        result.caveats += result.test_time.notes
    _draw_metric_figures(result, points)
    with tempfile.TemporaryDirectory(prefix="analysis-artifacts-") as cache:
        reader = ArtifactReader(MlflowClient(tracking_uri=sweep.tracking_uri), Path(cache))
        rec = result.recommendation
        figures, notes = probe_figures(reader, sweep.trials, out / "figures", rec.num_registers, rec.register_depth)
    result.figures.update(figures)
    result.caveats += notes + [f"could not read {m}" for m in reader.missing[:10]]
    result.report_path = write_outputs(result)
    if log_to_mlflow:
        result.analysis_run_id = log_analysis_run(result)
    return result


def _draw_metric_figures(result: AnalysisResult, points: pd.DataFrame) -> None:
    folder = result.out_dir / "figures"
    drawn = {"emergence_progress": emergence_progress_figure(points, result.threshold, folder / "emergence_progress.png")}
    for group in sorted(points["group"].unique(), key=cat.group_sort_key):
        name = group.replace("/", "-")  # 'dino/mini' -> emergence_depth_dino-mini
        drawn[f"emergence_depth_{name}"] = emergence_depth_figure(points, group, result.threshold, folder / f"emergence_depth_{name}.png")
    drawn["register_effect"] = register_effect_figure(result.stats, result.recommendation.steps_used, folder / "register_effect.png")
    drawn["register_depth_effect"] = register_depth_figure(
        result.stats, result.recommendation.steps_used, folder / "register_depth_effect.png"
    )
    result.figures.update({name: path for name, path in drawn.items() if path is not None})


def skipped_summary(sweep: Sweep) -> str:
    """'3 runs skipped (1 FAILED; 2 stopped early, at steps 20 and 40, so their metrics are not
    those of their full length)'. Stopped trials (by the scheduler, or on the emergence of artifacts
    with probe.on_emergence: stop) still count in the emergence map."""
    stopped = sorted(s.stopped_at_step or 0 for s in sweep.skipped if s.stopped_at_step is not None)
    others = [s.status for s in sweep.skipped if s.stopped_at_step is None]
    parts = [f"{n} {status}" for status, n in pd.Series(others, dtype=object).value_counts().items()]
    if stopped:
        steps = sorted(set(stopped))
        at = ", ".join(map(str, steps[:-1])) + (" and " if len(steps) > 1 else "") + str(steps[-1])
        parts.append(
            f"{len(stopped)} stopped early, at step{'s' if len(steps) > 1 else ''} {at},"
            " so their metrics are not those of their full length (their probes still count in the emergence map)"
        )
    return f"{len(sweep.skipped)} runs skipped ({'; '.join(parts)})"


def data_caveats(sweep: Sweep, stats: pd.DataFrame) -> list[str]:
    """Sentences on what limits the conclusions: skipped runs, seeds, missing metrics."""
    caveats: list[str] = []
    if sweep.skipped:
        caveats.append(f"{skipped_summary(sweep)}; they are listed below and in skipped_runs.csv.")
    if sweep.duplicates_dropped:
        caveats.append(
            f"{len(sweep.duplicates_dropped)} finished runs repeated a setting and seed of a later run and were "
            f"replaced by it: {', '.join(r[:8] for r in sweep.duplicates_dropped[:10])}."
        )
    trials = sweep.trials_frame()
    other = {k for axes in trials["other_axes"] for k, _ in axes}
    varied = sorted(k for k in other if len({dict(a).get(k) for a in trials["other_axes"]}) > 1)
    if varied:
        caveats.append(
            f"Other swept keys ({', '.join(varied)}) are pooled with the seeds: means and intervals mix their values."
        )
    seeds = trials.groupby(["objective", "model_size", "num_registers", "register_depth", "steps"])["seed"].nunique()
    if seeds.max() < 2:
        caveats.append("One seed per setting: no confidence intervals, so the sweep cannot tell close results apart.")
    elif seeds.min() < 2:
        single = ", ".join(f"{o} {s} r{setting_label(r, d)} {n} steps" for (o, s, r, d, n) in seeds[seeds < 2].index[:8])
        caveats.append(f"Some settings have one seed only ({single}): their intervals are undefined.")
    if (trials["num_registers"] == 0).sum() == 0:
        caveats.append("No trial without registers: the emergence of artifacts cannot be mapped.")
    if trials["num_registers"].nunique() < 2:
        caveats.append("Only one register count was swept: the effect of registers cannot be measured.")
    final_keys = sweep.final_values().groupby("key")["run_id"].nunique() if not sweep.history.empty else pd.Series(dtype=int)
    for spec in cat.REGISTER_METRICS:
        have = int(final_keys.get(spec.key, 0))
        if have == 0:
            caveats.append(f"No trial logged {spec.key} ({spec.label}): it is missing from the tables and figures.")
        elif have < len(trials):
            caveats.append(f"{len(trials) - have} of {len(trials)} trials did not log {spec.key} ({spec.label}).")
    return caveats


def sweep_command(sweep: Sweep) -> str:
    """The command that launched the sweep, for advice on what to run next: the spec file the
    launch recorded on its parent run, or a placeholder."""
    spec_files = set()
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    for parent in {t.launch_run_id for t in sweep.trials if t.launch_run_id}:
        try:
            spec_files.add(client.get_run(parent).data.tags.get(cat.SPEC_FILE_TAG) or "SPEC")
        except Exception:  # a deleted parent run: advice only, never a failure
            spec_files.add("SPEC")
    spec = spec_files.pop() if len(spec_files) == 1 else "SPEC"
    return f"python -m orchestrator.sweep {spec}"
