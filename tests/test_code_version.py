"""Every run names the code it ran: the commit (or source digest) of this checkout, wherever the sweep starts.

Checked the way a run gets its tag: a fresh Python process that imports orchestrator/ from a
clone or from a copy, run from an unrelated working directory (PROJECT_ROOT, not an argument).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.launch.run import PACKAGE_DIRS, PROJECT_ROOT, NoSourcesError, code_version, source_digest

ROOT = Path(__file__).resolve().parents[1]
EMPTY_DIGEST = f"src-{hashlib.sha1().hexdigest()[:12]}"  # what a digest of no files would say


def tag_of(project: Path, cwd: Path, **env: str) -> str:
    """The code-version tag that a sweep importing orchestrator/ from `project` records."""
    environment = {k: v for k, v in os.environ.items() if k not in ("GIT_COMMIT", "PYTHONPATH")}
    environment.update(PYTHONPATH=str(project), **env)
    done = subprocess.run(
        [sys.executable, "-c", "from orchestrator.launch.run import code_version; print(code_version())"],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip()


def copy_sources(target: Path) -> Path:
    """The project as a source archive or `ray job submit --working-dir` ships it: no .git."""
    for entry in (*PACKAGE_DIRS, "sweeps", "pyproject.toml"):
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, target / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / entry)
    return target


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_the_project_root_is_the_folder_that_holds_the_packages() -> None:
    assert PROJECT_ROOT == ROOT
    assert all((PROJECT_ROOT / package / "__init__.py").is_file() for package in PACKAGE_DIRS)


def test_a_copy_without_git_is_named_by_a_digest_of_its_sources(tmp_path: Path) -> None:
    project = copy_sources(tmp_path / "job_working_dir")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tag = tag_of(project, elsewhere)
    assert tag.startswith("src-") and tag != EMPTY_DIGEST
    assert tag == f"src-{source_digest(ROOT)}"  # the same sources give the same name
    assert tag_of(project, elsewhere) == tag

    # An edit to the trainer changes the name; a spec is input, recorded with each launch, not code.
    loop = project / "trainers" / "loop.py"
    loop.write_text(loop.read_text() + "\n# edited\n")
    edited = tag_of(project, elsewhere)
    assert edited.startswith("src-") and edited != tag
    (project / "sweeps" / "quickstart.yaml").write_text("name: changed\n")
    assert tag_of(project, elsewhere) == edited
    assert tag_of(project, elsewhere, GIT_COMMIT="abc123") == "abc123"


def test_a_clone_names_its_commit_and_an_edited_trainer_makes_it_dirty(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    if (ROOT / ".git").exists():
        git(tmp_path, "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone))
        for package in PACKAGE_DIRS:  # replaced by the code under test, which may not be committed yet
            shutil.rmtree(clone / package)
            shutil.copytree(ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
    else:  # tests run from a source archive: the clone's history starts here
        git(tmp_path, "init", "--quiet", str(clone))
        copy_sources(clone)
    git(clone, "add", "--all")
    git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", "code under test")
    head = git(clone, "rev-parse", "HEAD")
    assert tag_of(clone, tmp_path) == head

    loop = clone / "trainers" / "loop.py"
    original = loop.read_text()
    loop.write_text(original + "\n# edited\n")
    assert tag_of(clone, tmp_path) == f"{head}-dirty"
    loop.write_text(original)
    assert tag_of(clone, tmp_path) == head
    (clone / "orchestrator" / "new_module.py").write_text("X = 1\n")  # a new source file is code too
    assert tag_of(clone, tmp_path) == f"{head}-dirty"


def test_a_copy_inside_another_repository_is_not_named_by_that_repository(tmp_path: Path) -> None:
    outer = tmp_path / "home"
    project = copy_sources(outer / "unpacked")
    git(outer, "init", "--quiet")
    (outer / "dotfile").write_text("x\n")
    git(outer, "add", "dotfile")
    git(outer, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "dotfiles")
    assert tag_of(project, tmp_path) == f"src-{source_digest(ROOT)}"


def test_a_root_without_sources_is_an_error_not_the_empty_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    with pytest.raises(NoSourcesError, match="no sources of orchestrator, trainers"):
        code_version(tmp_path)
