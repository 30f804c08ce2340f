"""Opening the MLflow tracking store: a new SQLite file safely, any failure as one line.

MLflow's tracking store creates a new database's tables on first open (its alembic
migrations), without a lock. Two processes doing that to the same new file (the sweep and
an `mlflow ui` or a monitoring script started beside it) fail with `table ... already
exists` or `duplicate column`, and can leave the file half-migrated for good (checked with
MLflow 3.17). So for a SQLite file that does not exist yet, the sweep builds the whole
schema in a file of its own beside it and moves that into place with os.link, which never
replaces a file: whoever opens the path afterwards finds every table there and migrates
nothing. A file that exists but is not at MLflow's newest schema revision may be being created
by another process right now: the sweep waits until it is complete, or until nobody has
changed it for QUIET_S, before opening it (then MLflow does what it always does: upgrade
an old store, or say it cannot).

All of this runs under MLflow's own lock for initialising that database (the file
`db_init_lock-<md5 of the URL>` in the temp folder, which MLflow's job and workspace stores
take), so two sweeps starting together wait for each other.

MLflow is imported inside the functions: the sweep driver imports this module before Ray
starts, and MLflow only in a thread beside Ray's start (orchestrator/launch/run.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import quote

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# A store file nobody changed for this long is not being created by anyone. Generous: on a
# loaded machine a migrating process can go seconds without a write (alembic loading its scripts).
QUIET_S = 5.0
WAIT_S = 120.0  # at most this long for another process to finish creating a store
POLL_S = 0.05


class StoreError(RuntimeError):
    """The tracking store cannot be opened. str(e) is one line naming the store."""


def open_client(uri: str) -> MlflowClient:
    """MlflowClient(uri), with a new SQLite store created safely (see the module docstring)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        path = sqlite_file(uri)
        if path is None:
            return _client(uri)
        with init_lock(uri):
            created = not path.exists() and create_beside(path)
            if not created:
                wait_while_created_elsewhere(path)
            return _client(uri)
    except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as error:
        raise StoreError(f"MLflow store {uri} cannot be opened: {first_line(error)}") from None


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)  # creates the store (and a new database's tables) now


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:// URI; None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


@contextlib.contextmanager
def init_lock(uri: str) -> Iterator[None]:
    """MLflow's lock for initialising the database at `uri` (mlflow.store.db.utils._safe_initialize_tables)."""
    from sqlalchemy.engine import make_url

    digest = hashlib.md5(str(make_url(uri)).encode(), usedforsecurity=False).hexdigest()
    with open(f"{tempfile.gettempdir()}/db_init_lock-{digest}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_beside(path: Path) -> bool:
    """Build a complete store in a private file next to `path`, then link it there unless
    another process has created `path` meanwhile (os.link never replaces a file). True if
    the store at `path` is the one built here."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        _client(f"sqlite:///{partial}")
        try:
            os.link(partial, path)
        except OSError:  # created meanwhile, or no hard links on this filesystem
            return False
        return True
    finally:
        partial.unlink(missing_ok=True)


def wait_while_created_elsewhere(path: Path) -> None:
    """Return once the store at `path` is at MLflow's newest schema revision, or nobody has
    changed it for QUIET_S, or WAIT_S have passed."""
    head = head_revision()
    start = changed = time.monotonic()
    last = None
    while True:
        state = file_state(path)
        if state is None or (head is not None and state[-1] == head):
            return
        now = time.monotonic()
        if state != last:
            last, changed = state, now
        elif now - changed >= QUIET_S or now - start >= WAIT_S:
            return
        time.sleep(POLL_S)


def head_revision() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision  # what the store checks on open

        return str(_get_latest_schema_revision())
    except (ImportError, AttributeError):
        return None  # another MLflow: only the quiet rule applies


def file_state(path: Path) -> tuple[Any, ...] | None:
    """(size, mtime, journal present, schema revision), or None if there is no file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    journal = path.with_name(path.name + "-journal").exists()
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=0.2)
        ) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = row[0] if row else None
    except sqlite3.Error as error:  # no tables yet, locked by a writer, not a database
        revision = f"unreadable: {error}"
    return (stat.st_size, stat.st_mtime_ns, journal, revision)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
