"""The documented team setup with a real sweep: infra/mlflow/serve.sh (loopback, basic auth,
proxied artifacts) receives a sweep and its analysis, and a person views them in the MLflow UI.

One server and one real sweep (`python -m orchestrator.sweep sweeps/quickstart.yaml`, shrunk
through --set, probes on) serve every test of this module. Without a browser: the runs, the
probe files and figures, and the analysis's report and figures are read back through the
server; a wrong password stops the sweep in the preflight with one line and exit 2. In
headless Chromium (found on PATH): the first test expands the sweep's parent run and picks
the model.num_registers param and axis.num_registers tag columns by hand, and the trials
appear only under their parent with their register counts; the second opens the link of
orchestrator/stores/mlflow_ui.py instead, where the axes and the key metrics are columns at
once. Both keep a screenshot (copied to $UI_SCREENSHOT_DIR if set).

Chromium: a machine without it skips the browser tests, unless CI_REQUIRE_BROWSER is set, as
.ci/run sets it: CI fails instead of skipping them.
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
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright

from orchestrator.stores.axes import STUDY_AXES
from orchestrator.stores.mlflow_ui import runs_view_url
from sweep_helpers import ROOT, sweep_env
from trainers.probes import names
from trainers.probes.names import TRAIN_LOSS, VAL_TOP1

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI_REQUIRE_BROWSER"),
    reason="no chromium on PATH (apt-get install chromium); CI sets CI_REQUIRE_BROWSER and fails instead",
)

SERVE_SCRIPT = ROOT / "infra" / "mlflow" / "serve.sh"
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
REGISTER_COUNTS = (0, 2, 4)
STEPS = 6


@dataclass(frozen=True)
class RunningServer:
    url: str
    username: str
    password: str
    state_dir: Path


@dataclass(frozen=True)
class SweepInServer:
    """What the real sweep wrote to the server, looked up the way a person would find it."""

    sweep_name: str
    experiment_id: str
    parent_run_id: str
    parent_run_name: str
    trial_runs: dict[int, tuple[str, str]]  # register count -> (run id, run name)
    analysis_run_name: str
    model_size: str
    folder: Path  # where the sweep ran (its analysis output is there too)


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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state_dir = tmp_path_factory.mktemp("mlflow-server")
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
        with pytest.MonkeyPatch.context() as patch:
            # This process's MLflow client reads basic-auth credentials from these, as users' jobs do.
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            yield RunningServer(f"http://127.0.0.1:{port}", "admin", password, state_dir)
    finally:
        subprocess.run(
            ["bash", str(SERVE_SCRIPT), "stop"], env=env, capture_output=True, timeout=60
        )
        _kill_leftover_group(state_dir / "mlflow-server.pid")


def team_env(server: RunningServer, folder: Path, password: str | None = None) -> dict[str, str]:
    """A team member's shell: the server's URL and their basic-auth credentials, nothing else of MLflow."""
    return sweep_env(
        folder,
        MLFLOW_TRACKING_URI=server.url,
        MLFLOW_TRACKING_USERNAME=server.username,
        MLFLOW_TRACKING_PASSWORD=password if password is not None else server.password,
    )


def run_cli(server: RunningServer, folder: Path, module: str, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=folder, env=team_env(server, folder, password),
        capture_output=True, text=True, timeout=900,
    )


SWEEP_SETS = (
    f"grid.model.num_registers={list(REGISTER_COUNTS)}", "grid.model.size=[micro]", f"grid.steps=[{STEPS}]",
    "train.eval_every=3", "train.probe.every=3", "train.log_every=3",
)


def sweep_args(folder: Path) -> list[str]:
    sets = [*SWEEP_SETS, f"storage={folder / 'ray_results'}"]
    return [str(ROOT / "sweeps" / "quickstart.yaml"), *[arg for s in sets for arg in ("--set", s)]]


@pytest.fixture(scope="module")
def real_sweep(mlflow_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> SweepInServer:
    """The quickstart, shrunk, launched from a team member's shell against the server; then its analysis."""
    folder = tmp_path_factory.mktemp("team-sweep")
    done = run_cli(mlflow_server, folder, "orchestrator.sweep", *sweep_args(folder))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = authenticated_client(mlflow_server)
    experiment = client.get_experiment_by_name("quickstart")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'parent'")
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'trial'")
    analysed = run_cli(
        mlflow_server, folder, "orchestrator.analyze", "--experiment", "quickstart",
        "--parent-run", parent.info.run_id, "--out", str(folder / "analysis"),
    )
    assert analysed.returncode == 0, analysed.stdout[-3000:] + analysed.stderr[-3000:]
    (analysis,) = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'analysis'")
    return SweepInServer(
        sweep_name="quickstart",
        experiment_id=experiment.experiment_id,
        parent_run_id=parent.info.run_id,
        parent_run_name=parent.info.run_name,
        trial_runs={int(r.data.tags[TAG_COLUMN]): (r.info.run_id, r.info.run_name) for r in trials},
        analysis_run_name=analysis.info.run_name,
        model_size="micro",
        folder=folder,
    )


def authenticated_client(server: RunningServer) -> MlflowClient:
    return MlflowClient(server.url)  # the credentials are in the environment (the mlflow_server fixture)


# ----------------------------------------------------------------------------- through the server


def test_the_sweep_and_its_probes_are_read_back_through_the_server(
    mlflow_server: RunningServer, real_sweep: SweepInServer, tmp_path: Path
) -> None:
    client = authenticated_client(mlflow_server)
    assert sorted(real_sweep.trial_runs) == list(REGISTER_COUNTS)
    for registers, (run_id, _) in real_sweep.trial_runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == real_sweep.parent_run_id
        assert [m.step for m in client.get_metric_history(run_id, names.outlier_frac(names.OUTPUT))] == [3, STEPS]
        # Proxied artifacts: uploaded through the server, stored in its artifacts folder, downloaded through it.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        local = Path(client.download_artifacts(run_id, names.artifact_dir(STEPS), str(tmp_path / str(registers))))
        figure = local / names.NORM_HIST_FIGURE
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import numpy as np

        with np.load(local / names.NORMS_FILE) as norms:
            assert norms["hist_reg"].shape[1] == registers  # the trial's own registers' histograms
    stored = list((mlflow_server.state_dir / "artifacts").rglob(names.NORM_HIST_FIGURE))
    assert len(stored) == len(REGISTER_COUNTS)


def test_the_analysis_is_published_through_the_server(mlflow_server: RunningServer, real_sweep: SweepInServer, tmp_path: Path) -> None:
    client = authenticated_client(mlflow_server)
    (analysis,) = client.search_runs(
        [real_sweep.experiment_id], filter_string="tags.`sweep.role` = 'analysis'"
    )
    assert analysis.data.tags["mlflow.parentRunId"] == real_sweep.parent_run_id
    published = {a.path for a in client.list_artifacts(analysis.info.run_id)}
    assert "report.md" in published, published
    local = Path(client.download_artifacts(analysis.info.run_id, "report.md", str(tmp_path)))
    assert local.read_text() == (real_sweep.folder / "analysis" / "report.md").read_text()
    figures = [a.path for a in client.list_artifacts(analysis.info.run_id, "figures") if a.path.endswith(".png")]
    assert figures
    image = Path(client.download_artifacts(analysis.info.run_id, figures[0], str(tmp_path)))
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_a_wrong_password_stops_the_sweep_in_the_preflight_with_one_line(
    mlflow_server: RunningServer, tmp_path: Path
) -> None:
    done = run_cli(mlflow_server, tmp_path, "orchestrator.sweep", *sweep_args(tmp_path), password="not-the-password")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: MLflow server {mlflow_server.url} refused the credentials (HTTP 401); "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ]
    assert not (tmp_path / "ray_results").exists()  # nothing started, nothing written


# ----------------------------------------------------------------------------- in the browser


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
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            http_credentials={"username": server.username, "password": server.password},
            viewport={"width": 1600, "height": 900},
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


@needs_chromium
def test_sweep_trials_are_nested_under_parent_with_register_counts(
    mlflow_server: RunningServer, real_sweep: SweepInServer, tmp_path: Path
) -> None:
    sweep = real_sweep
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
        # The parent, its trials and the analysis run nested beside them.
        assert f"{1 + len(sweep.trial_runs) + 1} matching runs" in page.inner_text("body")

        parent_row.first.locator(f'[col-id="{NAME_COLUMN}"] button').first.click()
        last_trial_name = sweep.trial_runs[max(sweep.trial_runs)][1]
        page.get_by_text(last_trial_name, exact=True).wait_for()
        _show_column(page, PARAM_COLUMN)
        _show_column(page, TAG_COLUMN)
        page.locator(f'[col-id="params.`{PARAM_COLUMN}`"]').first.wait_for()
        page.locator(f'[col-id="tags.`{TAG_COLUMN}`"]').first.wait_for()

        # Expanded: the parent stays first and its trials and analysis follow it, each
        # trial showing its register count in the param and tag columns.
        row_count = 1 + len(sweep.trial_runs) + 1
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
        assert sweep.analysis_run_name in shown, f"runs table shows {shown}; screenshot: {screenshot}"
        shown.pop(sweep.analysis_run_name)
        assert shown == expected, f"runs table shows {shown}; screenshot: {screenshot}"


@needs_chromium
def test_runs_view_link_shows_the_axes_and_key_metrics_as_columns(
    mlflow_server: RunningServer, real_sweep: SweepInServer, tmp_path: Path
) -> None:
    sweep = real_sweep
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
            for index in range(1, 1 + len(sweep.trial_runs) + 1)  # the trials and the analysis run
        }
        shown.pop(sweep.analysis_run_name, None)
        screenshot = _save_screenshot(page, tmp_path, "mlflow_runs_view.png")
        expected = {name: (str(count), sweep.model_size, True) for count, (_, name) in sweep.trial_runs.items()}
        assert shown == expected, f"runs table shows {shown}; screenshot: {screenshot}"
