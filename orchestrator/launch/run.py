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
seconds of waiting on its processes, so a thread meanwhile imports MLflow and opens the store
(`start_ray_beside_mlflow`); then the parent run is opened (orchestrator/launch/parent_run.py)
and the Tuner built (orchestrator/launch/tuner.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ray import tune

from orchestrator.launch.console import _size_order, results_table
from orchestrator.launch.emergence_view import emergence_row, emergence_table
from orchestrator.launch.credentials import credentials_in_file
from orchestrator.launch.record import Launch, launch_path, read_record
from orchestrator.launch.tune_state import ensure_restorable
from orchestrator.spec.plan import SweepPlan
from orchestrator.spec.schema import SweepSpec
from orchestrator.stores.mlflow_uri import default_tracking_uri
from trainers.probes.names import VAL_TOP1

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# The code a run is named by: the driver and the trainer. sweeps/ is left out on purpose:
# a spec is input, not code, and each launch records its resolved spec (spec/resolved.yaml on
# the parent run) and the spec's digest, so an edited spec is never hidden either.
PACKAGE_DIRS = ("orchestrator", "trainers")
# The repository root (orchestrator/launch/run.py -> parents[2]), the folder that holds PACKAGE_DIRS.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
    results: list[str]  # the results table, as lines (orchestrator/launch/console.py)


class LaunchFinishedError(RuntimeError):
    """The launch folder holds a finished sweep (or another spec's launch); nothing to resume."""


class NoSourcesError(RuntimeError):
    """The folder named as the project root holds none of the package sources."""


def code_version(project_root: Path = PROJECT_ROOT) -> str:
    """The git commit of the checkout this code runs from (`-dirty` when a file under
    orchestrator/ or trainers/ differs from it), or GIT_COMMIT, or (under `ray job submit` and
    from a source archive, which carry no .git) `src-` and a digest of the package sources, so
    every run names the code it ran. Looked up beside the packages, not in the working
    directory: a sweep started from elsewhere would otherwise record another repository's commit."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True, timeout=5, check=True)
        return done.stdout.strip()

    try:
        # A copy unpacked inside some other repository (a home folder under git) is not that
        # repository's commit: the commit names the code only if it tracks the sources.
        if git("ls-files", "--", *PACKAGE_DIRS):
            dirty = git("status", "--porcelain", "--", *PACKAGE_DIRS)
            return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    return f"src-{source_digest(project_root)}"


def source_digest(project_root: Path) -> str:
    """SHA-1 (12 hex digits) over the path and bytes of every .py file of PACKAGE_DIRS."""
    digest, files = hashlib.sha1(), 0
    for package in PACKAGE_DIRS:
        for path in sorted((project_root / package).rglob("*.py")):
            digest.update(path.relative_to(project_root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
            files += 1
    if not files:  # the digest of no files names no code: a wrong root, not a version
        raise NoSourcesError(f"no sources of {', '.join(PACKAGE_DIRS)} under {project_root}")
    return digest.hexdigest()[:12]


def spec_digest(spec: SweepSpec) -> str:
    return hashlib.sha1(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def init_ray(verbose: bool = False) -> bool:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process.
    True when this call did it (and the caller should call ray.shutdown), False if Ray was up.

    Unless verbose, the trial workers' own output stays in Ray's log files (a trial's error
    still reaches its MLflow run and the sweep's summary) and Ray says only what went wrong."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats reporting at start-up
    quiet = {} if verbose else {"logging_level": logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=verbose, **quiet)
        return True
    # A local Ray starts one idle worker per CPU for the driver's tasks. Tune's trial actors
    # carry their own runtime_env and never use those, so they only take CPU from the start-up.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    give_local_cluster_its_own_token()
    ray.init(include_dashboard=False, log_to_driver=verbose, **quiet)
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
    spec: SweepSpec,
    plan: SweepPlan,
    plan_text: str,
    overrides: Sequence[str],
    launch_name: str | None,
    verbose: bool = False,
    spec_file: str = "",
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
        verbose=verbose,
        spec_file=spec_file,
    )


def open_mlflow_store(launch: Launch) -> MlflowClient:
    """MLflow's import, the store (a new one gets its schema) and the Tune side's imports: the
    work that runs in a thread beside Ray's start. It writes no run, so it can be done again."""
    from orchestrator.launch.parent_run import open_store

    if not launch.verbose:
        # MLflow's import set its logger to INFO ("Creating initial MLflow database tables...").
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = open_store(launch)
    import orchestrator.launch.tuner  # noqa: F401  (the trainable's and callbacks' imports, off the main thread too)

    return client


def may_be_import_race(error: BaseException) -> bool:
    """An error that two threads importing at once can cause. When they import modules that
    import each other in opposite orders, CPython does not hang: it lets one thread go on with
    the other's partially initialised module ("deadlock detected by _ModuleLock(...)" inside
    importlib), and an import then fails in one thread or both. A genuine ImportError (a
    missing package) fails again when that side is redone alone, and is raised then."""
    return isinstance(error, ImportError) or (
        isinstance(error, RuntimeError) and "deadlock detected" in str(error)
    ) or (isinstance(error, AttributeError) and "partially initialized module" in str(error))


def start_ray_beside_mlflow(launch: Launch, verbose: bool) -> tuple[bool, MlflowClient]:
    """Ray starts on this thread (it installs signal handlers here) while another imports MLflow
    and opens the store: on 2 cores that overlap saves 1-4 s per launch (docs/performance.md).

    Both sides import modules at the same time. Should a dependency ever make them import two
    modules that import each other in opposite orders, CPython does not hang but an import
    fails (`may_be_import_race`); that side is then done again alone, once the other has
    finished. So a change in Ray or MLflow can cost the overlap, never the launch, and no
    hand-kept list of shared modules is needed. Returns (whether this call started Ray, the
    MLflow client)."""
    import ray

    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(open_mlflow_store, launch)
        try:
            started_ray = init_ray(verbose)
        except Exception as error:
            if not may_be_import_race(error):
                raise
            wait([opening])
            ray.shutdown()
            started_ray = init_ray(verbose)
        try:
            client = opening.result()
        except Exception as error:
            if not may_be_import_race(error):
                if started_ray:
                    ray.shutdown()  # the caller never learns that Ray was started here
                raise
            client = open_mlflow_store(launch)
    return started_ray, client


def run_sweep(
    spec: SweepSpec,
    plan: SweepPlan,
    plan_text: str,
    overrides: Sequence[str] = (),
    launch_name: str | None = None,
    verbose: bool = False,
    spec_file: str = "",
) -> SweepOutcome:
    launch = find_launch(spec, plan, plan_text, overrides, launch_name, verbose, spec_file)
    mended = ensure_restorable(launch.path, launch.name) if launch.resumed else None
    if mended:
        print(f"Tune's saved {mended} in {launch.path} was torn by the crash; restored Tune's state from its staging copy")

    started_ray = False
    # AWS keys leave the environment before Ray starts and Tune builds trial actors, which
    # would copy them into runtime envs that Ray logs (orchestrator/launch/credentials.py).
    with credentials_in_file() as moved:
        if moved is not None and os.environ.get("RAY_ADDRESS"):
            print(
                "note: AWS keys in this driver's environment are not handed to the cluster's trial workers; "
                "they use their node's credentials (instance role, pod identity, ~/.aws): see README, Credentials",
                file=sys.stderr,
            )
        try:
            started_ray, client = start_ray_beside_mlflow(launch, verbose)
            from orchestrator.launch.autoscaling import cluster_for_launch
            from orchestrator.launch.parent_run import open_launch
            from orchestrator.launch.tuner import fit_launch

            # Before the parent run: a trial no node can hold is a bad spec (SpecError, exit 2).
            cluster = cluster_for_launch(spec, len(plan.trials), in_process=not os.environ.get("RAY_ADDRESS"))
            record = open_launch(launch, client)

            results = fit_launch(launch, client, record, ask_autoscaler=cluster is None or cluster.autoscaling)
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
        results_table([result_row(r.config, r.metrics) for r in results]) + artifacts_table(results),
    )


def artifacts_table(results: Any) -> list[str]:
    """Whether and when artifacts emerged per setting (orchestrator/launch/emergence_view.py), after a blank line."""
    from orchestrator.trials.trainable import trial_config

    rows = []
    for r in results:
        probe = trial_config(r.config["train"], r.config["trial"]["axes"]).probe
        size, steps, registers, _, depth = result_row(r.config, r.metrics)
        rows.append(emergence_row(size, steps, registers, r.metrics, probe.monitor and probe.every > 0, depth))
    table = emergence_table(rows, _size_order)
    return ["", *table] if table else []


def result_row(config: dict[str, Any], metrics: dict[str, Any]) -> tuple[str, int, int, float | None, int]:
    """(size, steps, registers, val top-1, register depth) of one finished or failed trial; the size names the
    objective too unless it is supervised (val top-1 is k-NN for DINO, zero-shot for CLIP)."""
    from orchestrator.trials.trainable import trial_config

    cfg = trial_config(config["train"], config["trial"]["axes"])
    top1 = metrics.get(VAL_TOP1) if metrics else None
    size = cfg.model.label if cfg.objective == "supervised" else f"{cfg.objective} {cfg.model.label}"
    return size, cfg.steps, cfg.model.num_registers, top1, cfg.model.register_depth
