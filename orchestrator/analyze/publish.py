"""Log an analysis back into the sweep's experiment: the report, tables and figures as
artifacts, the key numbers as params and metrics.

The run sits where its sweep is and says what it analysed: the analysis of one launch (the
trials of one parent run, with `--parent-run` or because the experiment holds one launch) is
nested under that parent run beside its trials and named `analysis <parent run name>`; an
analysis that pools several launches is a top-level run named
`analysis <experiment> (<n> launches)`. Its `sweep.role` tag is `analysis`, so it never counts
as one of the launch's trials (orchestrator/stores/mlflow_runs.py child_runs).
"""

from __future__ import annotations

import re

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.load import Sweep
from orchestrator.analyze.result import AnalysisResult

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _key(*parts: object) -> str:
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts)


def analysis_run_place(client: MlflowClient, sweep: Sweep, parent_run: str | None) -> tuple[str, str | None]:
    """(run name, parent run id or None) of the analysis of `sweep` (see the module docstring)."""
    launches = {parent_run} if parent_run else {t.launch_run_id for t in sweep.trials if t.launch_run_id}
    if len(launches) == 1:
        (launch,) = launches
        return f"analysis {client.get_run(launch).info.run_name or launch}", launch
    return f"analysis {sweep.experiment_name} ({len(launches)} launches)", None


def log_analysis_run(result: AnalysisResult) -> str:
    """Create the run, log everything, and return its id."""
    sweep, rec = result.sweep, result.recommendation
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    run_name, parent = analysis_run_place(client, sweep, result.parent_run)
    tags = {cat.ROLE_TAG: cat.ANALYSIS_ROLE, cat.SWEEP_NAME_TAG: sweep.experiment_name}
    if parent:
        tags[cat.PARENT_TAG] = parent
        tags["analysis.parent_run"] = parent
    run = client.create_run(sweep.experiment_id, tags=tags, run_name=run_name)
    run_id = run.info.run_id
    params = {
        "threshold": f"{result.threshold:g}",
        "metric_for_best": rec.metric,
        "recommendation_rule": rec.rule[:500],
        "recommended_num_registers": str(rec.num_registers) if rec.num_registers is not None else "none",
        "parent_run": result.parent_run or "all",
        "skipped_run_ids": ",".join(s.run_id for s in sweep.skipped)[:6000] or "none",
    }
    now = get_current_time_millis()
    metrics = {
        "trials": len(sweep.trials),
        "skipped_runs": len(sweep.skipped),
        "can_tell": float(rec.can_tell),
    }
    if rec.num_registers is not None:
        metrics["recommended_num_registers"] = rec.num_registers
    if rec.covers_depth and rec.register_depth is not None:  # the rule chose a (count, depth) pair
        params["recommended_register_depth"] = str(rec.register_depth)
        metrics["recommended_register_depth"] = rec.register_depth
    for p in result.emergence:
        # Supervised keys keep their pre-objective names (emergence/mini/...); others add the objective.
        group = _group(p.objective, p.model_size)
        metrics[_key("emergence", *group, f"steps_{p.steps}", "emerged")] = float(p.status == "emerged")
        for name, value in (("step", p.step), ("fraction", p.fraction), ("block", p.block)):
            if value is not None:
                metrics[_key("emergence", *group, f"steps_{p.steps}", name)] = float(value)
    for b in result.best:
        size = b.model_size.rpartition("/")[2]  # the group label carries the objective when several were swept
        metrics[_key("best_num_registers", *_group(b.objective, size), f"steps_{b.steps}", b.metric)] = b.best
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("mlflow.note.content", f"{run_name} ({len(sweep.trials)} trials): see report.md")],
    )
    client.log_artifacts(run_id, str(result.out_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _group(objective: str, size: str) -> tuple[str, ...]:
    return (size,) if objective == cat.DEFAULT_OBJECTIVE else (objective, size)
