"""`ray job submit --working-dir . -- python -m orchestrator.sweep SPEC` against a running head.

The working dir is a copy of the repository with the junk a real checkout collects
(a virtualenv, .git, local data, MLflow and Tune outputs); the package Ray unpacks on the
head must hold the code and none of that. Ray's own defaults (.gitignore, and .git/.venv
since 2.60) are switched off for the upload, so .rayignore is shown to be enough alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from ray_head import RAY, RayHead, ray_head
from sweep_helpers import ROOT, tiny_spec

KEPT = ("orchestrator/sweep.py", "trainers/data/base.py", "sweeps/quickstart.yaml", "pyproject.toml")
JUNK = {
    ".git/objects/pack/big.pack": b"x" * 1024,
    ".venv/lib/site.py": b"junk",
    "data/train/0001.bin": b"\0" * 1024,
    "mlruns/0/meta.yaml": b"junk",
    "ray_results/old/experiment_state.json": b"{}",
    "mlflow.db": b"junk",
}
# Top-level entries of the working tree that are never part of the code.
NOT_COPIED = {".git", ".venv", "venv", "data", "mlruns", "ray_results", "mlflow.db", ".pytest_cache", "analysis_out"}


RAY_DEFAULTS_OFF = {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""}


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as running:
        yield running


def repo_copy_with_junk(target: Path) -> Path:
    def skip(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == ROOT
        return {n for n in names if (top and n in NOT_COPIED) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(ROOT, target, ignore=skip)
    for relative, data in JUNK.items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(data)
    return target


def test_rayignore_alone_keeps_the_code_and_leaves_out_the_junk(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    workdir = repo_copy_with_junk(tmp_path / "checkout")
    package = tmp_path / "package.zip"
    create_package(str(workdir), package, include_gitignore=False)  # .rayignore only, no default excludes
    names = set(zipfile.ZipFile(package).namelist())
    assert set(KEPT) <= names
    tops = {name.split("/")[0] for name in names}
    assert not tops & {".git", ".venv", "data", "mlruns", "ray_results", "mlflow.db"}, sorted(tops)


@pytest.mark.slow
def test_submitted_sweep_runs_with_a_clean_package(head: RayHead, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    workdir = repo_copy_with_junk(tmp_path / "checkout")
    # Storage and MLflow artifacts at absolute paths: the job's working dir is a throwaway
    # copy on the head (MLflow's default artifact root, ./mlruns, would land in it).
    spec = tiny_spec(tmp_path, mlflow={"artifact_location": str(tmp_path / "mlartifacts")})
    (workdir / "sweeps" / "e2e_job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}}

    submit_env = {**head.env, **RAY_DEFAULTS_OFF}
    done = subprocess.run(
        [
            RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(workdir),
            "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "-m", "orchestrator.sweep", "sweeps/e2e_job.yaml",
        ],
        cwd=tmp_path, env=submit_env, capture_output=True, text=True, timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, output[-5000:]

    # The package as the head unpacked it: the code, none of the junk.
    # The package as the head unpacked it (and the job ran in): the code, none of the junk.
    unpacked = [s / "runtime_resources" / "working_dir_files" for s in head.session_dirs()]
    packages = [p for d in unpacked for p in d.glob("_ray_pkg_*") if p.is_dir()]
    assert len(packages) == 1, packages
    for kept in (*KEPT, "sweeps/e2e_job.yaml"):
        assert (packages[0] / kept).is_file(), kept
    tops = {p.name for p in packages[0].iterdir()}
    assert not tops & {".git", ".venv", "data", "mlruns", "ray_results", "mlflow.db"}, sorted(tops)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["axis.num_registers"] for r in children} == {"0", "2"}
    # No .git travelled, so the code is named by a digest of its sources: those it ran.
    from orchestrator.launch.run import source_digest

    assert {r.data.tags["git_commit"] for r in children} == {f"src-{source_digest(workdir)}"}
    assert parents[0].data.tags["git_commit"] == f"src-{source_digest(workdir)}"
