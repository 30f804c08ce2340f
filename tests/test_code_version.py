"""Every run names the code it ran: the commit (or source digest) of this checkout, wherever the sweep starts."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from orchestrator.launch.run import PACKAGE_DIRS, code_version

ROOT = Path(__file__).resolve().parents[1]
EMPTY_DIGEST = f"src-{hashlib.sha1().hexdigest()[:12]}"  # what a digest of no files would say


def test_the_version_does_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    here = code_version()
    monkeypatch.chdir(tmp_path)  # not a git repository, and no packages beside it
    assert code_version() == here
    assert here != EMPTY_DIGEST


def test_without_git_the_digest_covers_the_package_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "job_working_dir"  # like `ray job submit --working-dir .`: sources, no .git
    for package in PACKAGE_DIRS:
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    digest = code_version(project)
    assert digest.startswith("src-") and digest != EMPTY_DIGEST
    assert code_version(project) == digest
    (project / PACKAGE_DIRS[0] / "__init__.py").write_text("# changed\n")
    assert code_version(project) != digest
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert code_version(project) == "abc123"
