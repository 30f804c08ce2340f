"""One launch of a sweep: MLflow parent run, Ray, the Tuner, and resuming after a crash.

A launch lives in `<storage>/<launch name>` (Tune's experiment folder). A small record
there (sweep_launch.json) names its MLflow parent run and whether it finished. Running
the same command again finds the record: an unfinished launch is restored (finished
trials are not re-run, each trial keeps its one MLflow run); a finished one is reported
and left alone.

What a resume does (checked against Ray 2.60): first tune_state.ensure_restorable checks
that Tune's saved state files load (a crash can tear them). Tune's experiment state, saved at most
every ~10 s, brings back the trials with their ids, statuses and last checkpoints; the
Tuner's pickled state brings back the searcher, scheduler and our callback. Trials that
were running restart from their last checkpoint and reattach to their MLflow run by the
trial id tag (metrics already in the store are not written twice). A trial that finished
after the last state save restarts, finds its run FINISHED and only reports its result
again. Errored trials stay errored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow.fs
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.callbacks import MlflowTrialBookkeeping
from orchestrator.checkpoints import CheckpointPruner
from orchestrator.tracking import (
    FAILURE_TAG,
    LAUNCH_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    child_runs,
    default_tracking_uri,
    get_or_create_experiment,
)
from orchestrator.trainable import SweepContext, run_trial, trial_label
from orchestrator.tune_state import ensure_restorable

RECORD_FILE = "sweep_launch.json"
PACKAGE_DIRS = ("orchestrator", "trainers")


@dataclass
class LaunchRecord:
    parent_run_id: str
    experiment_id: str
    spec_digest: str
    state: str  # "running" | "finished"


@dataclass
class SweepOutcome:
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    launch_path: str
    trials: int
    errored: int
    resumed: bool


class LaunchFinishedError(RuntimeError):
    """The launch folder holds a finished sweep; nothing to resume."""


def storage_uri(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def launch_path(storage: str, launch_name: str) -> str:
    return f"{storage_uri(storage).rstrip('/')}/{launch_name}"


def read_record(path: str) -> LaunchRecord | None:
    fs, root = pyarrow.fs.FileSystem.from_uri(path)
    target = f"{root}/{RECORD_FILE}"
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as stream:
        return LaunchRecord(**json.loads(stream.readall()))


def write_record(path: str, record: LaunchRecord) -> None:
    """Written whole or not at all: a local file is replaced by rename, an object store PUT is atomic."""
    fs, root = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(root, recursive=True)
    target = f"{root}/{RECORD_FILE}"
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    written = f"{target}.partial" if local else target
    with fs.open_output_stream(written) as stream:
        stream.write(json.dumps(asdict(record), indent=2).encode())
    if local:
        os.replace(written, target)


def code_version() -> str:
    """The git commit, or GIT_COMMIT, or (under `ray job submit`, which ships no .git) a
    digest of the package sources, so every run names the code it ran."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", *PACKAGE_DIRS], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    digest = hashlib.sha1()
    for package in PACKAGE_DIRS:
        for path in sorted(Path(package).rglob("*.py")):
            digest.update(path.read_bytes())
    return f"src-{digest.hexdigest()[:12]}"


def spec_digest(spec: Any) -> str:
    return hashlib.sha1(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def open_parent_run(
    client: MlflowClient,
    experiment_id: str,
    spec: Any,
    launch_name: str,
    overrides: Sequence[str],
    plan_text: str,
    commit: str,
) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"{launch_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={ROLE_TAG: "parent", SWEEP_TAG: spec.name, LAUNCH_TAG: launch_name, "git_commit": commit},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "overrides", " ".join(overrides) if overrides else "(none)")
    client.log_text(run_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec/resolved.yaml")
    client.log_text(run_id, plan_text, "spec/plan.txt")
    return run_id


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str) -> int:
    """Runs left RUNNING by a killed driver become KILLED; a restored trial sets its own back to RUNNING."""
    orphans = [r for r in child_runs(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(orphans)


def abandon_launch(client: MlflowClient, record: LaunchRecord) -> None:
    """An interrupted launch: its parent and unfinished trial runs become KILLED (the record stays
    'running', so the same command resumes it and sets them RUNNING again)."""
    close_orphans(client, record.experiment_id, record.parent_run_id)
    client.set_terminated(record.parent_run_id, status="KILLED")


def report_failures(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    failed = [r for r in child_runs(client, experiment_id, parent_run_id) if r.info.status == "FAILED"]
    for run in sorted(failed, key=lambda r: r.info.run_name or ""):
        reason = run.data.tags.get(FAILURE_TAG, "no reason recorded")
        print(f"Trial {run.info.run_name} failed (MLflow run {run.info.run_id}): {reason}", file=sys.stderr)


def init_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process.
    True when this call did it (and the caller should call ray.shutdown), False if Ray was up."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats reporting at start-up
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def resourced_trainable(spec: Any) -> Any:
    """run_trial with the spec's per-trial resources: the same for a fresh and a restored Tuner."""
    from ray import tune

    return tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def build_tuner(spec: Any, plan: Any, context: SweepContext, callback: MlflowTrialBookkeeping, name: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.search import GridCellSearcher

    trainable = resourced_trainable(spec)
    param_space: dict[str, Any] = {"train": spec.train.model_dump(mode="json"), "sweep": asdict(context)}
    search_alg, num_samples = None, 1
    if spec.search is None:
        param_space["trial"] = tune.grid_search([{"index": t.index, "axes": t.axes} for t in plan.trials])
    else:
        space = {key: entry.model_dump() for key, entry in spec.search.space.items()}
        cells = grid_cells(plan.trials, space)
        search_alg = GridCellSearcher(
            cells, space, spec.search.num_samples, spec.search.metric, spec.search.mode, seed=spec.train.seed
        )
        num_samples = len(cells) * spec.search.num_samples
    scheduler = None
    if spec.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
            max_t=max(t.config.steps for t in plan.trials),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=spec.max_concurrent,
        trial_name_creator=lambda trial: trial_label(trial.config["trial"]["axes"], trial.config["trial"]["index"]),
        trial_dirname_creator=lambda trial: f"trial_{trial.config['trial']['index']:04d}_{trial.trial_id}",
        # A finished trial's worker runs the next trial (function trainables restart their
        # training thread with the new config): torch, timm and MLflow are imported once per
        # slot instead of once per trial. Every trial asks for the same resources, as reuse needs.
        reuse_actors=True,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_uri(spec.storage),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune keeps every checkpoint; CheckpointPruner deletes superseded ones once no saved
        # experiment state can point at them (Tune's own num_to_keep deletes too early for a resume).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[callback, CheckpointPruner(keep=2)],
        verbose=1,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def grid_cells(trials: Sequence[Any], space: dict[str, Any]) -> list[dict[str, Any]]:
    """Distinct grid assignments (searched keys removed), in plan order."""
    cells: list[dict[str, Any]] = []
    for trial in trials:
        cell = {k: v for k, v in trial.axes.items() if k not in space}
        if cell not in cells:
            cells.append(cell)
    return cells


def run_sweep(
    spec: Any, plan: Any, plan_text: str, overrides: Sequence[str] = (), launch_name: str | None = None
) -> SweepOutcome:
    from ray import tune

    name = launch_name or spec.name
    path = launch_path(spec.storage, name)
    tracking_uri = default_tracking_uri()
    digest = spec_digest(spec)
    record = read_record(path)
    resumed = bool(record and record.state == "running" and tune.Tuner.can_restore(path))
    if record and record.state == "finished":
        raise LaunchFinishedError(
            f"launch {name!r} in {path} already finished (MLflow parent run {record.parent_run_id}); "
            f"pass --launch NEW_NAME to run the sweep again"
        )
    if record and resumed and record.spec_digest != digest:
        raise LaunchFinishedError(
            f"launch {name!r} in {path} was started from a different spec; resume it with the same spec "
            f"and --set options, or pass --launch NEW_NAME"
        )

    mended = ensure_restorable(path, name) if resumed else None
    if mended:
        print(f"Tune's saved {mended} in {path} was torn by the crash; restored Tune's state from its staging copy")

    commit = code_version()

    def open_launch() -> tuple[MlflowClient, LaunchRecord]:
        # The first client of a new SQLite store creates its schema (about 2 s): part of
        # what this thread does while Ray starts.
        client = MlflowClient(tracking_uri)
        if resumed:
            assert record is not None
            client.update_run(record.parent_run_id, status="RUNNING")
            closed = close_orphans(client, record.experiment_id, record.parent_run_id)
            print(f"Resuming launch {name!r} from {path} (parent run {record.parent_run_id}; {closed} interrupted trial runs)")
            return client, record
        if record is not None:
            # Killed before Tune saved anything to restore from: close the old runs, start over.
            abandon_launch(client, record)
            print(f"Launch {name!r} in {path} had no Tune state to restore; starting it again")
        experiment_id = get_or_create_experiment(client, spec.experiment_name, spec.mlflow.artifact_location)
        parent_run_id = open_parent_run(client, experiment_id, spec, name, overrides, plan_text, commit)
        fresh = LaunchRecord(parent_run_id, experiment_id, digest, "running")
        write_record(path, fresh)
        return client, fresh

    # Ray's start and MLflow's (schema creation on a new store, the parent run) are both
    # seconds of mostly waiting: do them at once. Ray stays on the main thread (signals).
    started_ray = False
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = pool.submit(open_launch)
            started_ray = init_ray()
            client, record = opening.result()
        context = SweepContext(tracking_uri, record.experiment_id, record.parent_run_id, commit)
        results = fit_launch(spec, plan, context, client, record, path, name, resumed)
    finally:
        if started_ray:
            import ray

            # Now rather than at interpreter exit, where Ray's hook first sleeps half a second.
            ray.shutdown()
    return SweepOutcome(
        spec.experiment_name,
        record.experiment_id,
        record.parent_run_id,
        tracking_uri,
        path,
        len(results),
        results.num_errors,
        resumed,
    )


def fit_launch(
    spec: Any,
    plan: Any,
    context: SweepContext,
    client: MlflowClient,
    record: LaunchRecord,
    path: str,
    name: str,
    resumed: bool,
) -> Any:
    """Run (or restore and finish) the Tuner; close the MLflow parent run. Tune's ResultGrid."""
    from ray import tune

    experiment_id, parent_run_id = record.experiment_id, record.parent_run_id
    if resumed:
        tuner = tune.Tuner.restore(
            path,
            trainable=resourced_trainable(spec),
            # Errored trials already used up their max_failures retries (or diverged):
            # their FAILED runs are results, like finished trials, and are not re-run.
            resume_unfinished=True,
            resume_errored=False,
        )
    else:
        callback = MlflowTrialBookkeeping(context.tracking_uri, experiment_id, parent_run_id)
        tuner = build_tuner(spec, plan, context, callback, name)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        abandon_launch(client, record)
        raise
    if results.num_terminated + results.num_errors < len(results):
        # Tune turns the first Ctrl+C into a normal return with unfinished trials.
        abandon_launch(client, record)
        print(f"\nSweep interrupted; run the same command again to resume launch {name!r} from {path}", file=sys.stderr)
        raise SystemExit(130)
    close_orphans(client, experiment_id, parent_run_id)  # Tune is done with every trial
    report_failures(client, experiment_id, parent_run_id)
    client.set_tag(parent_run_id, "trials.errored", str(results.num_errors))
    client.set_tag(parent_run_id, "trials.total", str(len(results)))
    client.set_terminated(parent_run_id, status="FINISHED")
    record.state = "finished"
    write_record(path, record)
    return results
