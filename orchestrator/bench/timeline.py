"""Where a finished sweep's wall time went, read back from its MLflow runs.

The parent run is created once the driver has imported everything and passed preflight;
each trial's run is created by the driver when Tune has started the trial's actor (a new
worker process, or a reused one), and is closed when the trial has trained, logged and
checkpointed. So the run timestamps cut the sweep's wall time into start-up, trials, gaps
between trials on one slot and shut-down. The metrics keep the time the worker measured
them: the first training-loss window marks when training really began, as in the bare pool.
"""

from __future__ import annotations

import statistics
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.stores.mlflow_runs import PARENT_TAG, ROLE_TAG, TRIAL_ROLE
from trainers.probes import names


def slot_gaps(spans: list[tuple[float, float]]) -> list[float]:
    """Idle time between one trial ending and the next starting on the same slot.

    Each trial takes the slot that freed up most recently before it started (greedy);
    a trial that finds no free slot opens a new one and has no gap.
    """
    free_at: list[float] = []
    gaps: list[float] = []
    for start, end in sorted(spans):
        ready = [i for i, t in enumerate(free_at) if t <= start]
        if ready:
            slot = max(ready, key=lambda i: free_at[i])
            gaps.append(start - free_at[slot])
            free_at[slot] = end
        else:
            free_at.append(end)
    return gaps


def median_step_s(stamps: list[tuple[int, float]]) -> float | None:
    """Training pace: the median over log windows of seconds per step. The median leaves out
    the few windows that also hold an evaluation, a checkpoint or a probe."""
    stamps = sorted(stamps)
    per_step = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(stamps, stamps[1:]) if s2 > s1]
    return statistics.median(per_step) if per_step else None


def mean_ms(seconds: list[float | None]) -> float | None:
    """Mean of the known paces (a training too short for two log windows has none), in ms."""
    known = [s for s in seconds if s is not None]
    return 1000 * statistics.mean(known) if known else None


def sweep_timeline(tracking_uri: str, experiment: str, start: float, end: float, parallel: int) -> dict[str, Any]:
    """Phases of one sweep launch in seconds; start and end are the CLI's wall-clock bounds."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment {experiment!r} in {tracking_uri}: the sweep logged nothing")
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    parent = next(r for r in runs if r.data.tags.get(ROLE_TAG) == "parent")
    trials = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id and r.data.tags.get(ROLE_TAG) == TRIAL_ROLE]
    spans = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in trials if r.info.end_time]
    if not spans:
        raise RuntimeError(f"the sweep in {tracking_uri} has no finished trial runs")
    gaps = slot_gaps(spans)
    probes = [r.data.metrics[names.PROBE_SECONDS] for r in trials if names.PROBE_SECONDS in r.data.metrics]
    losses = [
        [(m.step, m.timestamp / 1000) for m in client.get_metric_history(r.info.run_id, names.TRAIN_LOSS)]
        for r in trials
    ]
    paces = [median_step_s(stamps) for stamps in losses]
    first_log = min((t for stamps in losses for _, t in stamps), default=None)
    parent_start = parent.info.start_time / 1000
    return {
        "driver_start_s": parent_start - start,
        "to_first_trial_s": min(s for s, _ in spans) - parent_start,
        "to_first_log_s": None if first_log is None else first_log - start,
        "trial_s_mean": sum(e - s for s, e in spans) / len(spans),
        "gap_s_mean": sum(gaps) / len(gaps) if gaps else 0.0,
        "gaps": len(gaps),
        "after_last_trial_s": end - max(e for _, e in spans),
        "probe_s_mean": sum(probes) / len(probes) if probes else None,
        "step_ms": mean_ms(paces),
        "trial_runs": len(trials),
        "slots": parallel,
    }
