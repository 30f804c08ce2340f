"""Read one sweep back from MLflow: its finished trials, the runs it skipped, and metric histories.

Speed matters for sweeps of a thousand runs: `search_runs` only has the latest value of each
metric, and one `get_metric_history` call per metric per run is a thousand round trips per key.
For SQL stores (sqlite/postgresql/mysql) we therefore read the store's tables directly, a handful
of queries per experiment and only the metric keys the analysis uses. HTTP servers and file stores
go through the client, in parallel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import sqlalchemy as sa
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.errors import AnalysisError
from orchestrator.stores.axes import AXIS_PREFIX, AXIS_REGISTER_DEPTH, LEGACY_DUPLICATES, STUDY_AXES
from orchestrator.stores.mlflow_uri import DEFAULT_TRACKING_URI
from orchestrator.stores.reachable import is_sql, store_problem

HISTORY_COLUMNS = ["run_id", "key", "step", "value"]


@dataclass(frozen=True)
class Trial:
    run_id: str
    trial_id: str
    model_size: str
    num_registers: int
    steps: int  # training length
    seed: str
    artifact_uri: str | None
    other_axes: tuple[tuple[str, str], ...] = ()  # further swept keys (e.g. axis.optim.lr), pooled by the analysis
    objective: str = cat.DEFAULT_OBJECTIVE  # supervised | dino | clip: the analysis groups by it
    num_classes: int | None = None  # of the data it trained on; None when unknown
    launch_run_id: str = ""  # the parent run of the launch that ran the trial
    register_depth: int = 0  # the block before which the registers enter; 0 = at the input
    # The trial's own emergence watch (trainers/emergence/keys.py tags): None when it did not watch.
    emergence_status: str | None = None  # emerged | none | unconfirmed
    emerged_at_step: int | None = None


TRIAL_COLUMNS = [f.name for f in fields(Trial)]


@dataclass(frozen=True)
class SkippedRun:
    run_id: str
    trial_id: str
    status: str
    reason: str
    axes: str  # 'size=mini registers=4 steps=100 seed=1', as far as known
    objective: str = cat.DEFAULT_OBJECTIVE
    stopped_at_step: int | None = None  # a FINISHED run that the sweep's scheduler stopped early


@dataclass
class Sweep:
    experiment_name: str
    experiment_id: str
    tracking_uri: str
    trials: list[Trial]
    skipped: list[SkippedRun]
    history: pd.DataFrame  # HISTORY_COLUMNS, one row per (run, key, step), of trials and stopped
    duplicates_dropped: list[str] = field(default_factory=list)  # run ids replaced by a later run of the same setting
    # Trials stopped before their length (a scheduler, probe.on_emergence: stop). Left out of every
    # final-length table (they are in `skipped` with the reason), but their probes up to the stop
    # still say whether and when artifacts emerged: the emergence map reads them.
    stopped: list[Trial] = field(default_factory=list)

    def trials_frame(self) -> pd.DataFrame:
        # The columns even when empty: a sweep whose every trial stopped early has no full-length results.
        return pd.DataFrame([t.__dict__ for t in self.trials], columns=TRIAL_COLUMNS)

    def watched_frame(self) -> pd.DataFrame:
        """Full-length and stopped trials: everything whose probes can map the emergence of artifacts."""
        return pd.DataFrame([t.__dict__ for t in [*self.trials, *self.stopped]], columns=TRIAL_COLUMNS)

    def final_values(self) -> pd.DataFrame:
        """Value of every loaded key at the last step it was logged: columns run_id, key, step, value."""
        if self.history.empty:
            return self.history.copy()
        ordered = self.history.sort_values("step", kind="stable")
        return ordered.groupby(["run_id", "key"], as_index=False).last()


@dataclass
class _RawRun:
    run_id: str
    status: str
    artifact_uri: str | None
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metric_keys: tuple[str, ...] = ()  # client path only: keys with a history to fetch


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def load_sweep(
    experiment: str,
    tracking_uri: str | None = None,
    parent_run: str | None = None,
    use_sql: bool | None = None,
) -> Sweep:
    """Load the finished trials of `experiment` (optionally only those under `parent_run`).

    use_sql: None picks the direct SQL reader for SQL stores and the client otherwise.
    Raises AnalysisError for an unreachable store, an unknown experiment or no finished trials.
    """
    uri = resolve_tracking_uri(tracking_uri)
    problem = store_problem(uri)
    if problem:
        raise AnalysisError(problem)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri)
    sql = is_sql(uri) if use_sql is None else use_sql
    raw = _sql_runs(uri, experiment_id) if sql else _client_runs(client, experiment_id)
    trial_runs = [r for r in raw if r.tags.get(cat.ROLE_TAG) == cat.TRIAL_ROLE]
    if parent_run is not None:
        trial_runs = [r for r in trial_runs if r.tags.get(cat.PARENT_TAG) == parent_run]
    trials, stopped, skipped, dropped = _classify(trial_runs)
    scope = f" under parent run {parent_run}" if parent_run else ""
    if not trial_runs:
        raise AnalysisError(f"experiment {experiment!r} holds no trial runs{scope}: nothing to analyse yet")
    if not trials and not stopped and {s.status for s in skipped} == {"FAILED"}:
        reasons = "; ".join(f"{s.run_id[:8]}: {s.reason}" for s in skipped[:3])
        raise AnalysisError(f"experiment {experiment!r}: all {len(skipped)} trial runs{scope} FAILED ({reasons})")
    if not trials and not stopped:
        listed = "; ".join(f"{s.run_id[:8]} ({s.reason})" for s in skipped[:5])
        detail = f" ({len(skipped)} skipped: {listed})" if skipped else f" ({len(trial_runs)} trial runs found)"
        raise AnalysisError(f"experiment {experiment!r} has no finished trials{scope}{detail}")
    wanted = {t.run_id for t in [*trials, *stopped]}
    history = _sql_history(uri, experiment_id) if sql else _client_history(client, [r for r in raw if r.run_id in wanted])
    history = history[history["run_id"].isin(wanted)].reset_index(drop=True)
    return Sweep(experiment, experiment_id, uri, trials, skipped, history, dropped, stopped)


# ---------------------------------------------------------------- store and experiment


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "active":
        return found.experiment_id
    existing = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    raise AnalysisError(f"no experiment named {name!r} at {uri}; existing experiments: {', '.join(existing) or 'none'}")


# ---------------------------------------------------------------- reading runs


def _sql_runs(uri: str, experiment_id: str) -> list[_RawRun]:
    engine = sa.create_engine(uri)
    eid = {"eid": int(experiment_id)}
    active = "r.experiment_id = :eid AND r.lifecycle_stage = 'active'"
    with engine.connect() as conn:
        runs = conn.execute(sa.text(f"SELECT run_uuid, status, artifact_uri, start_time FROM runs r WHERE {active}"), eid)
        by_id = {row[0]: _RawRun(row[0], row[1], row[2], row[3] or 0, {}, {}) for row in runs}
        for table, attr in (("tags", "tags"), ("params", "params")):
            query = f"SELECT t.run_uuid, t.key, t.value FROM {table} t JOIN runs r ON r.run_uuid = t.run_uuid WHERE {active}"
            for run_id, key, value in conn.execute(sa.text(query), eid):
                getattr(by_id[run_id], attr)[key] = value
    engine.dispose()
    return list(by_id.values())


def _sql_history(uri: str, experiment_id: str) -> pd.DataFrame:
    """All needed metric points of the experiment's trials in one query."""
    query = sa.text(
        "SELECT m.run_uuid AS run_id, m.key AS key, m.step AS step, m.value AS value, m.is_nan AS is_nan,"
        " m.timestamp AS timestamp FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid"
        " WHERE r.experiment_id = :eid AND r.lifecycle_stage = 'active'"
        " AND m.run_uuid IN (SELECT run_uuid FROM tags WHERE key = :role_key AND value = :role)"
        " AND (m.key LIKE :outliers ESCAPE '!' OR m.key IN :keys)"
    ).bindparams(sa.bindparam("keys", expanding=True))
    # '_' is a LIKE wildcard: escape it so that only the robust detector's keys match.
    outliers = cat.OUTLIER_PREFIX.replace("_", "!_") + "%"
    engine = sa.create_engine(uri)
    with engine.connect() as conn:
        params = {"eid": int(experiment_id), "role_key": cat.ROLE_TAG, "role": cat.TRIAL_ROLE}
        frame = pd.read_sql(query, conn, params={**params, "outliers": outliers, "keys": list(cat.SCALAR_KEYS)})
    engine.dispose()
    frame.loc[frame["is_nan"].astype(bool), "value"] = float("nan")
    return _dedupe_points(frame)


def _client_runs(client: MlflowClient, experiment_id: str) -> list[_RawRun]:
    runs: list[_RawRun] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{cat.ROLE_TAG}` = '{cat.TRIAL_ROLE}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        for run in page:
            info, data = run.info, run.data
            runs.append(
                _RawRun(
                    info.run_id, info.status, info.artifact_uri, info.start_time or 0,
                    dict(data.tags), dict(data.params), tuple(data.metrics),
                )
            )
        token = page.token
        if not token:
            return runs


def _client_history(client: MlflowClient, runs: list[_RawRun]) -> pd.DataFrame:
    """One get_metric_history call per needed (run, key), in parallel: the fallback for HTTP servers."""
    jobs = [
        (run.run_id, key)
        for run in runs
        for key in run.metric_keys
        if (key in cat.SCALAR_KEYS or cat.outlier_location(key) is not None)
    ]

    def fetch(job: tuple[str, str]) -> list[tuple[Any, ...]]:
        run_id, key = job
        return [(run_id, key, m.step, m.value, False, m.timestamp) for m in client.get_metric_history(run_id, key)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = [row for chunk in pool.map(fetch, jobs) for row in chunk]
    frame = pd.DataFrame(rows, columns=[*HISTORY_COLUMNS, "is_nan", "timestamp"])
    return _dedupe_points(frame)


def _dedupe_points(frame: pd.DataFrame) -> pd.DataFrame:
    """A resumed trial may log a step twice: keep the latest write."""
    frame = frame.sort_values("timestamp", kind="stable")
    frame = frame.drop_duplicates(["run_id", "key", "step"], keep="last")
    frame = frame.astype({"step": "int64", "value": "float64"})
    return frame[HISTORY_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- which runs count


# Any axis.* tag besides the study axes is a further swept key (orchestrator/stores/axes.py);
# runs of older stores repeat two study axes under their config paths, which are no further keys.
_STUDY_AXES = (*STUDY_AXES.values(), *LEGACY_DUPLICATES, AXIS_REGISTER_DEPTH)


def _axis(run: _RawRun, tag: str) -> str | None:
    value = run.tags.get(tag)
    return value if value not in (None, "") else run.params.get(cat.AXIS_PARAM_FALLBACK[tag])


def _classify(runs: list[_RawRun]) -> tuple[list[Trial], list[Trial], list[SkippedRun], list[str]]:
    """(full-length trials, trials stopped early, skipped runs with a reason, run ids dropped as
    duplicates): finished trials with readable axes; everything else is skipped with a reason."""
    kept: dict[tuple, tuple[_RawRun, Trial]] = {}
    stopped_trials: list[Trial] = []
    skipped: list[SkippedRun] = []
    dropped: list[str] = []
    for run in sorted(runs, key=lambda r: r.start_time):
        size, regs, steps = _axis(run, cat.AXIS_SIZE), _axis(run, cat.AXIS_REGISTERS), _axis(run, cat.AXIS_STEPS)
        seed = _axis(run, cat.AXIS_SEED) or run.run_id[:8]  # no seed recorded: every run is its own replicate
        objective = _axis(run, cat.AXIS_OBJECTIVE) or cat.DEFAULT_OBJECTIVE
        trial_id = run.tags.get(cat.TRIAL_ID_TAG, "")
        depth = _axis(run, cat.AXIS_REGISTER_DEPTH) or "0"
        axes = f"size={size} registers={regs} steps={steps} seed={seed}" + (f" depth={depth}" if depth != "0" else "")
        if run.status != "FINISHED":
            skipped.append(SkippedRun(run.run_id, trial_id, run.status, f"status {run.status}", axes, objective))
            continue
        stopped = run.tags.get(cat.STOPPED_AT_STEP_TAG)
        if stopped is not None:
            # Its last metrics are of step `stopped`, not of the length its axis names: counting
            # it as a result of that length would compare a short run with full ones.
            reason = run.tags.get(cat.STOPPED_REASON_TAG) or f"stopped early at step {stopped} by the sweep's scheduler"
            step = int(stopped) if stopped.isdigit() else None
            skipped.append(SkippedRun(run.run_id, trial_id, run.status, reason, axes, objective, step))
        try:
            if size is None:
                raise ValueError("model size")
            other = tuple(sorted((k, v) for k, v in run.tags.items() if k.startswith(AXIS_PREFIX) and k not in _STUDY_AXES))
            trial = Trial(
                run.run_id, trial_id, size, int(str(regs)), int(str(steps)), str(seed), run.artifact_uri, other,
                objective=objective, num_classes=_num_classes(run), launch_run_id=run.tags.get(cat.PARENT_TAG, ""),
                register_depth=int(str(depth)),
                **_emergence(run),
            )
        except (TypeError, ValueError):
            reason = f"unreadable axis tags ({cat.AXIS_SIZE}, {cat.AXIS_REGISTERS}, {cat.AXIS_STEPS})"
            if stopped is None:
                skipped.append(SkippedRun(run.run_id, trial_id, run.status, reason, axes, objective))
            continue
        if stopped is not None:
            stopped_trials.append(trial)
            continue
        setting = (
            trial.objective, trial.model_size, trial.num_registers, trial.register_depth, trial.steps, trial.seed, trial.other_axes
        )
        if setting in kept:  # a later launch re-ran the same setting and seed: keep the newest
            dropped.append(kept[setting][0].run_id)
        kept[setting] = (run, trial)
    return [trial for _, trial in kept.values()], stopped_trials, skipped, dropped


def _emergence(run: _RawRun) -> dict[str, Any]:
    step = run.tags.get(cat.EMERGED_AT_STEP_TAG)
    return {
        "emergence_status": run.tags.get(cat.EMERGENCE_STATUS_TAG),
        "emerged_at_step": int(step) if step and step.isdigit() else None,
    }


def _num_classes(run: _RawRun) -> int | None:
    """The trainable's tag; for runs from before it, the config (shapes names its count)."""
    value = run.tags.get(cat.NUM_CLASSES_TAG)
    data = run.params.get("data.name")
    if value is None and data in cat.KNOWN_CLASS_COUNTS:
        return cat.KNOWN_CLASS_COUNTS[data]
    if value is None and data in (None, "shapes"):
        value = run.params.get("data.num_classes")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
