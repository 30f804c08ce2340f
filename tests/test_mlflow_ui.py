"""A person's view of a sweep in the MLflow UI, served by infra/mlflow/serve.sh.

Starts the team's MLflow server recipe (loopback, basic auth on), writes one
sweep through it in the project's MLflow layout and opens the experiment in
headless Chromium. The first test expands the sweep's parent run and picks the
model.num_registers param and axis.num_registers tag columns by hand: the six
trials appear only under their parent and each row shows its register count.
The second opens the link of orchestrator/stores/mlflow_ui.py instead: the axes
and the key metrics are columns at once, nothing picked. Both keep a screenshot
(copied to $UI_SCREENSHOT_DIR if set).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from helpers_mlflow_store import SeededSweep, write_sweep
from orchestrator.stores.axes import STUDY_AXES
from orchestrator.stores.mlflow_ui import runs_view_url
from trainers.probes.names import TRAIN_LOSS, VAL_TOP1

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"
    ),
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_SCRIPT = REPO_ROOT / "infra" / "mlflow" / "serve.sh"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 60_000
PARAM_COLUMN = "model.num_registers"
TAG_COLUMN = "axis.num_registers"
NAME_COLUMN = "attributes.`Run Name`"


@dataclass(frozen=True)
class RunningServer:
    url: str
    username: str
    password: str


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_executable() -> str:
    # The venv running pytest owns the mlflow we test; PATH may not include it.
    beside_python = Path(sys.executable).parent / "mlflow"
    return str(beside_python) if beside_python.exists() else (shutil.which("mlflow") or "mlflow")


def _kill_leftover_group(pid_file: Path) -> None:
    """Last resort if `serve.sh stop` failed: end the server's process group."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[RunningServer]:
    state_dir = tmp_path / "mlflow-server"
    port = _free_loopback_port()
    password = "ui-test-" + secrets.token_urlsafe(12)
    env = {
        **os.environ,
        "MLFLOW_SERVER_STATE_DIR": str(state_dir),
        "MLFLOW_BIN": _mlflow_executable(),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
    }
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)
    started = subprocess.run(
        ["bash", str(SERVE_SCRIPT), "start", "--port", str(port), "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert started.returncode == 0, (
            f"serve.sh start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}"
        )
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in started.stdout
        yield RunningServer(f"http://127.0.0.1:{port}", "admin", password)
    finally:
        subprocess.run(
            ["bash", str(SERVE_SCRIPT), "stop"], env=env, capture_output=True, timeout=60
        )
        _kill_leftover_group(state_dir / "mlflow-server.pid")


@pytest.fixture()
def seeded_sweep(mlflow_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> SeededSweep:
    # The MLflow client reads basic-auth credentials from these, as users' jobs do.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    return write_sweep(mlflow_server.url)


def _close_assistant_panel(page) -> None:
    """The MLflow 3 assistant side panel squeezes the runs table; close it if shown."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() == 1 and close.is_visible():
        close.click()


def _show_column(page, name: str) -> None:
    """Tick one param/tag column in the runs table's column selector."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    search.fill(name)
    page.get_by_test_id("column-selector-tree").get_by_text(name, exact=True).click()
    page.keyboard.press("Escape")
    search.wait_for(state="hidden")


def _cell(page, row_index: int, col_id: str):
    return page.locator(f'[role=row][row-index="{row_index}"] [col-id="{col_id}"]').first


def _cell_text(page, row_index: int, col_id: str) -> str:
    return _cell(page, row_index, col_id).inner_text().strip()


def _run_name(page, row_index: int) -> str:
    # The name cell also holds the run's colour label; the name is its link.
    return _cell(page, row_index, NAME_COLUMN).locator("a").first.inner_text().strip()


def _save_screenshot(page, tmp_path: Path, name: str = "mlflow_sweep_runs.png") -> Path:
    shot_dir = tmp_path / "screenshots"
    shot_dir.mkdir(exist_ok=True)
    shot = shot_dir / name
    page.screenshot(path=str(shot), full_page=True)
    extra_dir = os.environ.get("UI_SCREENSHOT_DIR")
    if extra_dir:
        Path(extra_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(extra_dir) / shot.name)
    return shot


@contextmanager
def _browser_page(server: RunningServer, tmp_path: Path) -> Iterator:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            http_credentials={"username": server.username, "password": server.password},
            viewport={"width": 1600, "height": 900},
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_sweep_trials_are_nested_under_parent_with_register_counts(
    mlflow_server: RunningServer, seeded_sweep: SeededSweep, tmp_path: Path
) -> None:
    sweep = seeded_sweep
    experiment_url = f"{mlflow_server.url}/#/experiments/{sweep.experiment_id}/runs"
    with _browser_page(mlflow_server, tmp_path) as page:
        page.goto(experiment_url)
        page.get_by_text(sweep.sweep_name).first.wait_for()
        parent_row = page.locator("[role=row][row-index]").filter(
            has_text=sweep.parent_run_name
        )
        parent_row.first.wait_for()
        _close_assistant_panel(page)

        # Collapsed: the trials are not top-level rows, only the parent is.
        row_indices = {
            row.get_attribute("row-index")
            for row in page.locator("[role=row][row-index]").all()
        }
        assert row_indices == {"0"}
        assert _run_name(page, 0) == sweep.parent_run_name
        assert f"{1 + len(sweep.trial_runs)} matching runs" in page.inner_text("body")

        parent_row.first.locator(f'[col-id="{NAME_COLUMN}"] button').first.click()
        last_trial_name = sweep.trial_runs[max(sweep.trial_runs)][1]
        page.get_by_text(last_trial_name, exact=True).wait_for()
        _show_column(page, PARAM_COLUMN)
        _show_column(page, TAG_COLUMN)
        page.locator(f'[col-id="params.`{PARAM_COLUMN}`"]').first.wait_for()
        page.locator(f'[col-id="tags.`{TAG_COLUMN}`"]').first.wait_for()

        # Expanded: the parent stays first and its six trials follow it,
        # each showing its register count in the param and tag columns.
        row_count = 1 + len(sweep.trial_runs)
        assert _run_name(page, 0) == sweep.parent_run_name
        shown: dict[str, tuple[str, str]] = {}
        for index in range(1, row_count):
            shown[_run_name(page, index)] = (
                _cell_text(page, index, f"params.`{PARAM_COLUMN}`"),
                _cell_text(page, index, f"tags.`{TAG_COLUMN}`"),
            )
        expected = {
            run_name: (str(count), str(count))
            for count, (_, run_name) in sweep.trial_runs.items()
        }
        screenshot = _save_screenshot(page, tmp_path)
        assert shown == expected, f"runs table shows {shown}; screenshot: {screenshot}"


def test_runs_view_link_shows_the_axes_and_key_metrics_as_columns(
    mlflow_server: RunningServer, seeded_sweep: SeededSweep, tmp_path: Path
) -> None:
    sweep = seeded_sweep
    url = runs_view_url(mlflow_server.url, sweep.experiment_id, ["optim.lr"])
    assert url == f"{mlflow_server.url}/#/experiments/{sweep.experiment_id}/runs?viewStateShareKey=sweep-axes-metrics"
    axis_columns = [f"tags.`{tag}`" for tag in STUDY_AXES.values()]
    metric_columns = [f"metrics.`{key}`" for key in (VAL_TOP1, TRAIN_LOSS)]  # the ones this store has
    with _browser_page(mlflow_server, tmp_path) as page:
        page.goto(url)
        parent_row = page.locator("[role=row][row-index]").filter(has_text=sweep.parent_run_name)
        parent_row.first.wait_for()
        _close_assistant_panel(page)
        # The columns are there before anyone opens the column selector.
        for column in axis_columns + metric_columns:
            page.locator(f'[role=columnheader][col-id="{column}"]').first.wait_for()
        headers = page.locator("[role=columnheader][col-id]").evaluate_all("cells => cells.map(c => c.getAttribute('col-id'))")
        # The axes come first after the name and start time, in the study's order.
        assert [h for h in headers if h in axis_columns] == axis_columns, headers
        assert headers.index(axis_columns[-1]) < headers.index(metric_columns[0]), headers

        parent_row.first.locator(f'[col-id="{NAME_COLUMN}"] button').first.click()
        page.get_by_text(sweep.trial_runs[max(sweep.trial_runs)][1], exact=True).wait_for()
        shown = {
            _run_name(page, index): (
                _cell_text(page, index, f"tags.`{STUDY_AXES['model.num_registers']}`"),
                _cell_text(page, index, f"tags.`{STUDY_AXES['model.size']}`"),
                _cell_text(page, index, metric_columns[0]) != "-",
            )
            for index in range(1, 1 + len(sweep.trial_runs))
        }
        screenshot = _save_screenshot(page, tmp_path, "mlflow_runs_view.png")
        expected = {name: (str(count), "vit_tiny", True) for count, (_, name) in sweep.trial_runs.items()}
        assert shown == expected, f"runs table shows {shown}; screenshot: {screenshot}"
