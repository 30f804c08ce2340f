"""One launch of a sweep: find or start its record, start Ray, run the Tuner, resume after a crash.

A launch lives in `<storage>/<launch name>` (Tune's experiment folder; orchestrator/launch/record.py).
Its record names its MLflow parent run and whether it finished. Running the same command
again finds the record: an unfinished launch is restored (finished trials are not re-run,
each trial keeps its one MLflow run); a finished one is reported and left alone.

What a resume does (checked against Ray 2.60): first tune_state.ensure_restorable checks
that Tune's saved state files load (a crash can tear them). Tune's experiment state, saved at most
every ~10 s, brings back the trials with their ids, statuses and last checkpoints; the
Tuner's pickled state brings back the searcher, scheduler and our callback. Trials that
were running restart from their last checkpoint; the driver's callback finds their MLflow
runs again by the trial id tag (metrics already in the store are not written twice). A
trial that finished after the last state save restarts: from its final checkpoint it only
reports its result again; its run, found FINISHED, is left as it was. Errored trials stay
errored.

Start-up order, for speed: this module imports Ray and Tune but not MLflow. Ray's start is
seconds of waiting on its processes, so a thread meanwhile imports MLflow, sets up the
store and opens the parent run (orchestrator/launch/parent_run.py); the Tuner is built once both
are done (orchestrator/launch/tuner.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ray import tune

from orchestrator.launch.record import Launch, LaunchRecord, launch_path, read_record
from orchestrator.launch.tune_state import ensure_restorable
from orchestrator.spec.plan import SweepPlan
from orchestrator.spec.schema import SweepSpec
from orchestrator.stores.mlflow_uri import default_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PACKAGE_DIRS = ("orchestrator", "trainers")
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds PACKAGE_DIRS

# Modules that Ray's start (main thread) and the MLflow thread both import, found by
# tests/test_launch_imports.py for the pinned Ray and MLflow. They are imported before the
# thread starts: two threads importing modules that import each other can deadlock.
IMPORTED_BY_BOTH = (
    "click",
    "timeit",
    "opentelemetry.metrics",
    "opentelemetry.proto",
    "opentelemetry.sdk.environment_variables._internal",
    "opentelemetry.sdk.resources",
    "opentelemetry.sdk.util._configurator",
    "opentelemetry.sdk.util.instrumentation",
    "opentelemetry.semconv._incubating.attributes.otel_attributes",
    "opentelemetry.semconv._incubating.metrics.otel_metrics",
    "opentelemetry.trace",
)


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
    """The launch folder holds a finished sweep (or another spec's launch); nothing to resume."""


def code_version(project_root: Path = PROJECT_ROOT) -> str:
    """The git commit of the checkout this code runs from, or GIT_COMMIT, or (under `ray job
    submit`, which ships no .git) a digest of the package sources, so every run names the code
    it ran. Looked up beside the packages, not in the working directory: a sweep started from
    elsewhere would otherwise record another repository's commit, or the digest of no files."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True, timeout=5, check=True)
        return done.stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", *PACKAGE_DIRS) else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    digest = hashlib.sha1()
    for package in PACKAGE_DIRS:
        for path in sorted((project_root / package).rglob("*.py")):
            digest.update(path.relative_to(project_root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"src-{digest.hexdigest()[:12]}"


def spec_digest(spec: SweepSpec) -> str:
    return hashlib.sha1(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def init_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process.
    True when this call did it (and the caller should call ray.shutdown), False if Ray was up."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats reporting at start-up
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    # A local Ray starts one idle worker per CPU for the driver's tasks. Tune's trial actors
    # carry their own runtime_env and never use those, so they only take CPU from the start-up.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    give_local_cluster_its_own_token()
    ray.init(include_dashboard=False, log_to_driver=True)
    return True


def give_local_cluster_its_own_token() -> None:
    """Ray 2.60 starts an in-process cluster with token authentication on and, when no token is
    set, writes one to ~/.ray/auth_token. That file outlives the sweep, and its mere presence
    turns token auth on for every later `ray start` on the machine, whose `ray job submit` then
    fails unless RAY_AUTH_MODE=token (README, "Try the cluster path locally"). The in-process
    cluster lives and dies with this process, so it gets a random token in this process's
    environment instead (Ray reads RAY_AUTH_TOKEN before the file; the raylet and the trial
    workers inherit it): authentication stays on, and nothing is left on disk. A token the user
    set (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is used as it is."""
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def find_launch(
    spec: SweepSpec, plan: SweepPlan, plan_text: str, overrides: Sequence[str], launch_name: str | None
) -> Launch:
    """The launch this command means: new, or an interrupted one to resume. Raises
    LaunchFinishedError when the folder holds a finished launch or another spec's."""
    name = launch_name or spec.name
    path = launch_path(spec.storage, name)
    digest = spec_digest(spec)
    found = read_record(path)
    if found and found.state == "finished":
        raise LaunchFinishedError(
            f"launch {name!r} in {path} already finished (MLflow parent run {found.parent_run_id}); "
            f"pass --launch NEW_NAME to run the sweep again"
        )
    resumed = bool(found and found.state == "running" and tune.Tuner.can_restore(path))
    if found and resumed and found.spec_digest != digest:
        raise LaunchFinishedError(
            f"launch {name!r} in {path} was started from a different spec; resume it with the same spec "
            f"and --set options, or pass --launch NEW_NAME"
        )
    return Launch(
        spec=spec,
        plan=plan,
        plan_text=plan_text,
        overrides=tuple(overrides),
        name=name,
        path=path,
        tracking_uri=default_tracking_uri(),
        commit=code_version(),
        spec_digest=digest,
        found=found,
        resumed=resumed,
    )


def open_mlflow_side(launch: Launch) -> tuple[MlflowClient, LaunchRecord]:
    from orchestrator.launch.parent_run import open_launch

    opened = open_launch(launch)
    import orchestrator.launch.tuner  # noqa: F401  (the trainable's and callbacks' imports, off the main thread too)

    return opened


def run_sweep(
    spec: SweepSpec, plan: SweepPlan, plan_text: str, overrides: Sequence[str] = (), launch_name: str | None = None
) -> SweepOutcome:
    launch = find_launch(spec, plan, plan_text, overrides, launch_name)
    mended = ensure_restorable(launch.path, launch.name) if launch.resumed else None
    if mended:
        print(f"Tune's saved {mended} in {launch.path} was torn by the crash; restored Tune's state from its staging copy")

    for module in IMPORTED_BY_BOTH:
        importlib.import_module(module)
    started_ray = False
    try:
        # MLflow's import, store set-up and parent run beside Ray's start; Ray stays on
        # the main thread (it installs signal handlers there).
        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = pool.submit(open_mlflow_side, launch)
            started_ray = init_ray()
            client, record = opening.result()
        from orchestrator.launch.tuner import fit_launch

        results = fit_launch(launch, client, record)
    finally:
        if started_ray:
            import ray

            # Now rather than at interpreter exit, where Ray's hook first sleeps half a second.
            ray.shutdown()
    return SweepOutcome(
        spec.experiment_name,
        record.experiment_id,
        record.parent_run_id,
        launch.tracking_uri,
        launch.path,
        len(results),
        results.num_errors,
        launch.resumed,
    )
