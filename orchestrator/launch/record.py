"""A launch: one run of `python -m orchestrator.sweep` on a spec, and its record on storage.

A launch lives in `<storage>/<launch name>` (Tune's experiment folder, local or s3://).
Its record there (sweep_launch.json) names its MLflow parent run and whether it finished:
that is what lets the same command find an interrupted launch and resume it, or refuse to
rerun a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs

from orchestrator.spec.plan import SweepPlan
from orchestrator.spec.schema import SweepSpec

RECORD_FILE = "sweep_launch.json"


@dataclass
class LaunchRecord:
    parent_run_id: str
    experiment_id: str
    spec_digest: str
    state: str  # "running" | "finished"


@dataclass(frozen=True)
class Launch:
    """What the MLflow side (parent_run.py) and the Tune side (tuning.py) of a launch share."""

    spec: SweepSpec
    plan: SweepPlan
    plan_text: str  # as printed, and logged on the parent run
    overrides: tuple[str, ...]  # the --set options
    name: str
    path: str  # Tune's experiment folder: <storage>/<name>
    tracking_uri: str
    commit: str  # the code version every run is tagged with
    spec_digest: str
    found: LaunchRecord | None  # the record already in the folder, if any
    resumed: bool  # found a running launch that Tune can restore
    verbose: bool = False  # Ray's and Tune's own console output (--verbose)
    spec_file: str = ""  # as given on the command line


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
