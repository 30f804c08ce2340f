"""A new SQLite MLflow store opened by two processes at once.

MLflow's tracking store creates a new database's tables (and runs its migrations) on first
open, without a lock; two processes doing that to one new file fail with "table ... already
exists" or "duplicate column", and can leave the file half-migrated for good. The sweep
builds a new store's schema in a file of its own and moves it into place whole, and waits
for a store that another process is creating; nobody gets a traceback.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec

from orchestrator.stores.mlflow_store import StoreError, open_client

# A monitoring script or `mlflow ui`: plain MLflow, imported beforehand. With "wait" it opens
# the store the moment the file appears; with "now" it creates the store itself at once; with
# "hold" it creates it but stops in the middle, after MLflow's first tables and before its
# migrations, until a file named "release" appears beside the store.
OPENER = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
path, when = Path(sys.argv[1]), sys.argv[2]
if when == "hold":
    import mlflow.store.db.utils as db_utils
    migrate = db_utils._upgrade_db
    def held(engine):
        print("migrating", flush=True)
        while not path.with_name("release").exists():
            time.sleep(0.01)
        migrate(engine)
    db_utils._upgrade_db = held
print("ready", flush=True)
deadline = time.time() + 300
while when == "wait" and not path.exists():
    if time.time() > deadline:
        sys.exit("the store never appeared")
    time.sleep(0.001)
client = MlflowClient(f"sqlite:///{path}")
client.create_experiment("from-the-opener")
print("opened", flush=True)
"""


def start_opener(db: Path, when: str) -> subprocess.Popen[str]:
    opener = subprocess.Popen(
        [sys.executable, "-c", OPENER, str(db), when],
        cwd=db.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert opener.stdout is not None and opener.stdout.readline().strip() == "ready"
    return opener


def finish(opener: subprocess.Popen[str]) -> None:
    try:
        out, err = opener.communicate(timeout=300)
    finally:
        opener.kill()
    assert opener.returncode == 0 and out.strip() == "opened", err[-3000:]


def schema_revision(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def test_a_new_store_appears_whole(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    client = open_client(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert schema_revision(db) == head_revision()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # the private build file is gone


def test_a_store_another_process_is_creating_is_waited_for(tmp_path: Path) -> None:
    import mlflow.tracking  # noqa: F401  (imported beforehand, so the open below starts at once)

    db = tmp_path / "mlflow.db"
    opener = start_opener(db, "hold")
    # The other process is in the middle of creating the store: its first tables are there,
    # MLflow's migrations are not. That is the moment the open must not touch the file.
    assert opener.stdout is not None and opener.stdout.readline().strip() == "migrating"
    assert db.exists()
    with pytest.raises(sqlite3.Error):
        schema_revision(db)
    opened: dict[str, Any] = {}
    opening = threading.Thread(target=lambda: opened.update(client=open_client(f"sqlite:///{db}")))
    opening.start()
    opening.join(timeout=2)
    assert opening.is_alive(), "the store was opened while another process was creating it"
    (tmp_path / "release").touch()
    opening.join(timeout=300)
    client = opened["client"]
    client.create_experiment("from-the-sweep")
    finish(opener)
    assert {e.name for e in client.search_experiments()} == {"Default", "from-the-opener", "from-the-sweep"}
    assert schema_revision(db) == head_revision()


def test_a_store_that_cannot_be_opened_is_one_line_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError) as failed:
        open_client(f"sqlite:///{db}")
    assert str(failed.value) == (
        f"MLflow store sqlite:///{db} cannot be opened: (sqlite3.DatabaseError) file is not a database"
    )


def test_a_store_created_elsewhere_between_build_and_move_is_the_one_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other interleaving: another process creates the store after the sweep built its
    private copy and before it moves it into place. The move must not replace that store."""
    from orchestrator.stores import mlflow_store

    db = tmp_path / "mlflow.db"
    build = mlflow_store._client

    def build_then_let_another_process_create(uri: str) -> Any:
        client = build(uri)
        if uri.endswith(".partial"):
            finish(start_opener(db, "now"))  # creates mlflow.db and its experiment, to the end
        return client

    monkeypatch.setattr(mlflow_store, "_client", build_then_let_another_process_create)
    client = open_client(f"sqlite:///{db}")
    assert {e.name for e in client.search_experiments()} == {"Default", "from-the-opener"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


@pytest.mark.slow
def test_sweep_starts_while_another_process_opens_the_new_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from crash_helpers import start_sweep_cli

    db = tmp_path / "mlflow.db"
    spec = tiny_spec(tmp_path, grid={"model.num_registers": [0]})
    sweep = start_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)))
    try:
        # The moment the store appears, the sweep is paused (its whole process group), so the
        # other process opens and writes the new store while the sweep is in the middle of using it.
        deadline = time.monotonic() + 300
        while not db.exists():
            assert time.monotonic() < deadline and sweep.poll() is None
            time.sleep(0.001)
        os.killpg(sweep.pid, signal.SIGSTOP)
        assert schema_revision(db) == head_revision()  # it appeared whole: nothing left to migrate
        opener = start_opener(db, "now")
        # The opener opens the store while the sweep stands still. The sweep may have stopped inside
        # a write transaction, holding SQLite's write lock (no other writer can pass it, in any
        # program): it goes on after a moment, as a busy writer would, and the opener's write waits.
        time.sleep(1.0)
    finally:
        os.killpg(sweep.pid, signal.SIGCONT)
    finish(opener)
    returncode = sweep.wait(timeout=300)
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 0, output[-4000:]
    assert "Traceback" not in output and "already exists" not in output, output[-4000:]

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert sorted(r.data.tags.get("sweep.role") for r in runs) == ["parent", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_experiment_by_name("from-the-opener") is not None


@pytest.mark.slow
def test_a_sweep_on_a_store_that_cannot_be_opened_exits_2_with_one_line(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    spec = tiny_spec(tmp_path, grid={"model.num_registers": [0]})
    done = run_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)), timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: MLflow store sqlite:///{db} cannot be opened: (sqlite3.DatabaseError) file is not a database"]
    assert not (tmp_path / "ray_results" / "e2e").exists()  # no launch record, no Tune state
