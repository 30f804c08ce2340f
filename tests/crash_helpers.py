"""Crash-test helpers: start the sweep CLI in its own process group, watch the MLflow
store while it runs, kill processes, and check metric histories for gaps and repeats."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from sweep_helpers import sweep_env
from trainers.probes import names

POLL_SECONDS = 0.2


def start_sweep_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """The CLI in a new session (its own process group), output to files in tmp_path."""
    stdout = open(tmp_path / "sweep.out", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", *args],
        cwd=tmp_path,
        env=sweep_env(tmp_path, **env),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def output(tmp_path: Path) -> str:
    return (tmp_path / "sweep.out").read_text()


def store_client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def trial_runs(client: MlflowClient, experiment_name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'trial'")
    return sorted(runs, key=lambda r: r.info.run_name)


def parent_runs(client: MlflowClient, experiment_name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'parent'")


def train_loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS)]


def assert_restored_near(restored: int, last_written: int, every: int, steps: int) -> None:
    """A trial lost with its node restored a checkpoint at most one interval (`every` steps) before
    the last report the driver wrote to MLflow (`last_written`), or a later one (uploaded, but its
    report died with the node).

    One interval before is allowed because Tune registers a function trial's checkpoint in a
    second round trip to the trial (its `save` task) after it hands the report to the callbacks:
    a node lost between the two restores the checkpoint before (seen in CI: written 30,
    restored 20). The steps measured twice are written once (the driver skips logged steps)."""
    assert restored % every == 0, (restored, every)
    assert last_written - every <= restored < steps, (restored, last_written)


def store_has_runs(db: Path) -> bool:
    """True once the sweep has created the schema and its parent run (read with plain sqlite3,
    since an MlflowClient would run the schema migrations alongside the sweep's own)."""
    if not db.exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            return connection.execute("select count(*) from runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def try_ready(client: MlflowClient, ready: Callable[[MlflowClient], Any]) -> Any:
    try:
        return ready(client)
    except Exception:  # noqa: BLE001 (the store is being written; try again)
        return None


def wait_for_store(
    tmp_path: Path,
    process: subprocess.Popen[str],
    ready: Callable[[MlflowClient], Any],
    timeout: float = 240,
    frozen: bool = False,
) -> Any:
    """Poll the store until `ready(client)` returns something truthy (and return it).

    With `frozen`, a check that passes is repeated with the sweep's whole process group
    stopped (SIGSTOP), and a pass leaves it stopped, so that what was checked is still
    true when the caller kills the group: short trials finish between a check and a kill."""
    deadline = time.monotonic() + timeout
    client = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) too early:\n{output(tmp_path)[-4000:]}")
        if client is None and store_has_runs(tmp_path / "mlflow.db"):
            client = store_client(tmp_path)
        found = try_ready(client, ready) if client is not None else None
        if found and not frozen:
            return found
        if found:
            # Checked once running (the store may be mid-write), again frozen.
            os.killpg(process.pid, signal.SIGSTOP)
            found = try_ready(client, ready)
            if found:
                return found
            os.killpg(process.pid, signal.SIGCONT)
        time.sleep(POLL_SECONDS)
    process.kill()
    raise AssertionError(f"timed out waiting on the MLflow store:\n{output(tmp_path)[-4000:]}")


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    table: dict[int, tuple[int, str]] = {}
    listing = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        pid, ppid, *args = line.split(None, 2)
        table[int(pid)] = (int(ppid), args[0] if args else "")
    return table


def descendants(root: int) -> dict[int, str]:
    table = process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, args) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = args
                frontier.append(pid)
    return found


def survivors(pids: dict[int, str], timeout: float = 30) -> dict[int, str]:
    """Those of `pids` still alive (same pid and command line) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        alive = {pid: args for pid, args in pids.items() if pid in table and table[pid][1] == args}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def kill_sweep_group(process: subprocess.Popen[str]) -> dict[int, str]:
    """kill -9 the CLI's process group, as a crash would; returns the processes it had started."""
    started = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return started


def expected_steps(every: int, steps: int) -> list[int]:
    return list(range(every, steps + 1, every))
