"""Checking Tune's saved state before a resume, and mending a copy torn by a crash."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from orchestrator.launch.tune_state import TuneStateError, ensure_restorable

NAME = "sweep-a"
STATE = "experiment_state-2026-11-24_02-00-00.json"
SEARCHER = "searcher-state-2026-11-24_02-00-00.pkl"


def experiment_state(trials: int = 2) -> bytes:
    trial_data = [[json.dumps({"trainable_name": "run_trial", "trial_id": f"t{i}"}), json.dumps({})] for i in range(trials)]
    return json.dumps({"trial_data": trial_data, "runner_data": {}, "stats": {"start_time": 0.0}}).encode()


@pytest.fixture
def launch(tmp_path: Path) -> Path:
    folder = tmp_path / "ray_results" / NAME
    folder.mkdir(parents=True)
    (folder / STATE).write_bytes(experiment_state())
    (folder / SEARCHER).write_bytes(pickle.dumps({"issued": [2]}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {}}))
    (folder / "trial_0000_abc").mkdir()
    return folder


def staging(tmp_path: Path, session: str = "session_2026-11-24_02-00-00_1_1") -> Path:
    folder = tmp_path / "ray" / session / "artifacts" / "2026-11-24_02-00-00" / NAME / "driver_artifacts"
    folder.mkdir(parents=True)
    return folder


def tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def fill(folder: Path, issued: int = 2) -> None:
    (folder / STATE).write_bytes(experiment_state(trials=issued))
    (folder / SEARCHER).write_bytes(pickle.dumps({"issued": [issued]}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {}}))


def test_intact_state_is_left_alone(launch: Path, tmp_path: Path) -> None:
    fill(staging(tmp_path), issued=3)  # a newer staging copy does not matter while storage loads
    before = {p.name: p.read_bytes() for p in launch.iterdir() if p.is_file()}
    assert ensure_restorable(str(launch), NAME, tmp_path / "ray") is None
    assert {p.name: p.read_bytes() for p in launch.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("torn", [STATE, SEARCHER, "tuner.pkl"])
def test_torn_file_brings_back_the_whole_staging_set(launch: Path, tmp_path: Path, torn: str) -> None:
    # The staging folder is newer: a third trial was issued after the last upload. Taking
    # only the torn file from it would pair a trial list with an older searcher.
    newer = staging(tmp_path)
    fill(newer, issued=3)
    tear(launch / torn)

    assert ensure_restorable(str(launch), NAME, tmp_path / "ray") == torn
    for name in (STATE, SEARCHER, "tuner.pkl"):
        assert (launch / name).read_bytes() == (newer / name).read_bytes(), name
    assert not list(launch.glob(".*mended")), "the staged replacement was left behind"


def test_a_staging_folder_with_a_torn_file_is_skipped(launch: Path, tmp_path: Path) -> None:
    older = staging(tmp_path, "session_2026-11-24_01-00-00_1_1")
    fill(older, issued=2)
    newer = staging(tmp_path)
    fill(newer, issued=3)
    tear(newer / SEARCHER)
    tear(launch / STATE)

    assert ensure_restorable(str(launch), NAME, tmp_path / "ray") == STATE
    assert (launch / STATE).read_bytes() == (older / STATE).read_bytes()
    assert (launch / SEARCHER).read_bytes() == (older / SEARCHER).read_bytes()


def test_torn_file_without_a_copy_stops_the_resume_naming_it(launch: Path, tmp_path: Path) -> None:
    tear(launch / STATE)
    before = (launch / STATE).read_bytes()
    with pytest.raises(TuneStateError) as caught:
        ensure_restorable(str(launch), NAME, tmp_path / "ray")
    message = str(caught.value)
    assert str(launch / STATE) in message and "--launch" in message and "JSONDecodeError" in message
    assert (launch / STATE).read_bytes() == before, "a failed check must not change the launch folder"


def test_state_without_trials_cannot_be_resumed(launch: Path, tmp_path: Path) -> None:
    (launch / STATE).write_bytes(experiment_state(trials=0))
    with pytest.raises(TuneStateError, match="lists no trials"):
        ensure_restorable(str(launch), NAME, tmp_path / "ray")


def test_only_the_newest_state_file_is_read(launch: Path, tmp_path: Path) -> None:
    (launch / "experiment_state-2026-11-23_00-00-00.json").write_bytes(b"{torn")  # an older session's
    assert ensure_restorable(str(launch), NAME, tmp_path / "ray") is None


def test_remote_launch_folders_are_not_checked(tmp_path: Path) -> None:
    assert ensure_restorable(f"s3://bucket/ray_results/{NAME}", NAME, tmp_path / "ray") is None
