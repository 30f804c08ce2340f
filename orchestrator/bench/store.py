"""What a finished sweep's probes cost: their share of each trial's wall time, and what
each trial adds to the MLflow store (metric points, artifact bytes).

    python -m orchestrator.bench store --experiment quickstart [--json]

Reads through the MLflow client, so it works on any tracking store.
"""

from __future__ import annotations

import statistics
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.stores.mlflow_uri import default_tracking_uri
from orchestrator.stores.mlflow_runs import PARENT_TAG, ROLE_TAG
from trainers.probes import names


def artifact_bytes(client: MlflowClient, run_id: str, path: str | None = None) -> int:
    total = 0
    for entry in client.list_artifacts(run_id, path):
        total += artifact_bytes(client, run_id, entry.path) if entry.is_dir else (entry.file_size or 0)
    return total


def metric_points(client: MlflowClient, run_id: str, keys: list[str]) -> int:
    return sum(len(client.get_metric_history(run_id, key)) for key in keys)


def measure_store(experiment: str, tracking_uri: str | None = None) -> dict[str, Any]:
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {uri}")
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'FINISHED'"
    )
    if not runs:
        raise SystemExit(f"error: experiment {experiment!r} has no finished trial runs")
    shares, sizes, points = [], [], []
    for run in runs:
        wall_s = (run.info.end_time - run.info.start_time) / 1000
        probe_s = sum(m.value for m in client.get_metric_history(run.info.run_id, names.PROBE_SECONDS))
        shares.append(probe_s / wall_s if wall_s > 0 else 0.0)
        sizes.append(artifact_bytes(client, run.info.run_id))
        points.append(metric_points(client, run.info.run_id, list(run.data.metrics)))
    return {
        "benchmark": "store",
        "experiment": experiment,
        "tracking_uri": uri,
        "trials": len(runs),
        "launches": len({run.data.tags.get(PARENT_TAG) for run in runs}),
        "probe_share_mean": statistics.fmean(shares),
        "probe_share_max": max(shares),
        "artifact_bytes_per_trial_mean": statistics.fmean(sizes),
        "artifact_bytes_per_trial_max": max(sizes),
        "metric_points_per_trial_mean": statistics.fmean(points),
        "metric_points_per_trial_max": max(points),
    }


def format_store_result(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"experiment {result['experiment']!r}: {result['trials']} finished trials ({result['tracking_uri']})",
            f"probes       {100 * result['probe_share_mean']:.1f}% of a trial's wall time on average, "
            f"{100 * result['probe_share_max']:.1f}% at most",
            f"artifacts    {result['artifact_bytes_per_trial_mean'] / 1e3:.0f} KB per trial on average, "
            f"{result['artifact_bytes_per_trial_max'] / 1e3:.0f} KB at most",
            f"metrics      {result['metric_points_per_trial_mean']:.0f} points per trial on average, "
            f"{result['metric_points_per_trial_max']} at most",
        ]
    )
