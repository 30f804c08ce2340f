"""Tune's saved experiment state: check that it loads before a resume, and mend a torn copy.

Ray Tune (2.60) writes its state files (the trial list in experiment_state-*.json, the
search algorithm's state, tuner.pkl) into a driver staging folder, then copies that
folder to the launch folder in a background thread. The copy is not atomic on a local
filesystem, and a new snapshot can rewrite a staging file while the previous copy reads
it (`_ExperimentCheckpointManager.sync_up_experiment_state` saves before it waits for the
last sync). A sweep killed at that moment leaves a torn file in the launch folder. On
restore Tune then logs "Failed to restore the run state" and quietly starts a new
experiment without the sweep's config, so every trial fails.

So before a resume each state file Tune will read is loaded the way Tune loads it. A torn
one is replaced by an intact copy from the staging folder when this machine still has it
(a launch folder on local disk, resumed on the machine that ran it: the only case where
the copy is not atomic; an S3 PUT is). Otherwise the resume stops with a message naming
the file, before Ray starts and without touching the MLflow runs.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Callable

import ray.cloudpickle as cloudpickle
from ray.tune.utils.serialization import _loads_with_cloudpickle

# The files Tune.restore reads: the newest of each pattern (names end in a session timestamp).
EXPERIMENT_STATE = "experiment_state-*.json"
PICKLED_STATE = (
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)
TUNER_STATE = "tuner.pkl"


class TuneStateError(RuntimeError):
    """Tune's saved state for a launch cannot be read, so the launch cannot be resumed."""


def load_experiment_state(data: bytes) -> None:
    """Raise unless `data` is an experiment state Tune can restore trials from."""
    state = _loads_with_cloudpickle(data)
    if not state.get("trial_data"):
        raise ValueError("it lists no trials")
    for trial_json, run_metadata in state["trial_data"]:
        _loads_with_cloudpickle(trial_json)  # what Trial.from_json_state decodes first
        _loads_with_cloudpickle(run_metadata)


def load_pickle(data: bytes) -> None:
    cloudpickle.loads(data)


def files_to_check(folder: Path) -> list[tuple[str, Callable[[bytes], None]]]:
    """(file name, loader) for every state file a restore of `folder` reads."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    checks: list[tuple[str, Callable[[bytes], None]]] = []
    newest_state = max(fnmatch.filter(names, EXPERIMENT_STATE), default=None)
    if newest_state:
        checks.append((newest_state, load_experiment_state))
    for pattern in PICKLED_STATE:
        newest = max(fnmatch.filter(names, pattern), default=None)
        if newest:
            checks.append((newest, load_pickle))
    if TUNER_STATE in names:
        checks.append((TUNER_STATE, load_pickle))
    return checks


def loads(path: Path, loader: Callable[[bytes], None]) -> str | None:
    """None if the file at `path` loads, else why not."""
    try:
        loader(path.read_bytes())
        return None
    except Exception as error:  # noqa: BLE001 (any failure to load is what we look for)
        return f"{type(error).__name__}: {error}"[:200]


def ray_temp_dir() -> Path:
    """Where Ray keeps its sessions (and Tune its staging folders): Ray's own rule."""
    system = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(system) / "ray"


def first_problem(folder: Path) -> tuple[str, str] | None:
    """(file name, why) for the first state file in `folder` that does not load, else None."""
    for name, loader in files_to_check(folder):
        problem = loads(folder / name, loader)
        if problem is not None:
            return name, problem
    return None


def intact_staging_folders(launch_name: str, temp_dir: Path) -> list[Path]:
    """Tune's driver staging folders for this launch on this machine whose state all loads,
    the most recently written first (a resumed launch has one per Ray session)."""
    pattern = f"session_*/artifacts/*/{launch_name}/driver_artifacts"
    folders = {p.resolve() for p in temp_dir.glob(pattern) if any(p.glob(EXPERIMENT_STATE))}
    intact = [f for f in folders if first_problem(f) is None]

    def written(folder: Path) -> float:
        return max(p.stat().st_mtime for p in folder.glob(EXPERIMENT_STATE))

    return sorted(intact, key=written, reverse=True)


def state_files(folder: Path) -> list[Path]:
    patterns = (EXPERIMENT_STATE, *PICKLED_STATE, TUNER_STATE)
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, q) for q in patterns))


def replace_atomically(target: Path, source: Path) -> None:
    staged = target.with_name(f".{target.name}.mended")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def ensure_restorable(launch_path: str, launch_name: str, temp_dir: Path | None = None) -> str | None:
    """Check the state files of a launch folder; replace a torn set with Tune's staging copy.

    Returns the name of the torn file it found (and mended), None when all loaded. The
    state files are replaced together, from the one staging folder, so that the trial
    list and the searcher's record of the trials it issued stay of one age. Raises
    TuneStateError naming the file when there is no intact copy. A launch folder on
    remote storage (s3://) is not checked: its objects are written whole."""
    if "://" in launch_path:
        return None
    folder = Path(launch_path)
    problem = first_problem(folder)
    if problem is None:
        return None
    name, why = problem
    staging = intact_staging_folders(launch_name, temp_dir or ray_temp_dir())
    if not staging:
        raise TuneStateError(
            f"cannot resume launch {launch_name!r}: Tune's saved state {folder / name} is damaged ({why}) "
            f"and this machine has no intact copy. The MLflow runs so far are kept; "
            f"pass --launch NEW_NAME to run the sweep again as a new launch"
        )
    for source in state_files(staging[0]):
        replace_atomically(folder / source.name, source)
    return name
