"""Remake the README's pictures: the MLflow UI with a sweep's runs, and one analysis figure.

    python docs/make_screenshots.py                       # runs a small sweep first (a few minutes on 2 cores)
    python docs/make_screenshots.py --tracking-uri sqlite:///mlflow.db --experiment quickstart   # an existing sweep
    python docs/make_screenshots.py --work /tmp/shots      # keep the small sweep there, reuse it next time

Without --tracking-uri it runs the quickstart restricted to one model size and one training
length (six trials: registers 0/1/2/4/8/16) into a temporary store, and analyses it. It then
serves the store with `mlflow ui` on loopback, opens the sweep's runs view
(orchestrator/stores/mlflow_ui.py) in headless Chromium (Debian's /usr/bin/chromium, driven by
playwright; no browser download), expands the newest launch, and writes

    docs/mlflow_runs.png          the runs table: the launch, its trials and its analysis, the axes and metrics as columns
    docs/analysis_figure.png      the analysis report's register-effect figure

and stops the server. Nothing else is written to the checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's orchestrator, whatever is installed
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
SWEEP_OVERRIDES = ("--set", "grid.model.size=null", "--set", "grid.steps=null")  # registers only: 6 trials
FIGURE = "register_effect.png"
VIEWPORT = {"width": 1600, "height": 1000}
LAST_METRIC = "train/loss"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="an existing MLflow store (default: run a small sweep into a new one)")
    parser.add_argument("--experiment", default="quickstart", help="the sweep's experiment (default quickstart)")
    parser.add_argument("--work", type=Path, help="keep the small sweep's store here and reuse it when run again")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri = args.tracking_uri or run_small_sweep(work)
        analysis = work / "analysis"
        figure = analysis / "figures" / FIGURE
        if not figure.exists():  # a reused --work folder has its analysis already
            run(sys.executable, "-m", "orchestrator.analyze", "--experiment", args.experiment, "--out", str(analysis),
                env={"MLFLOW_TRACKING_URI": uri}, cwd=work)
        shutil.copyfile(figure, DOCS / "analysis_figure.png")
        with mlflow_ui(uri, work) as ui:
            screenshot_runs(uri, ui, args.experiment, DOCS / "mlflow_runs.png", work)
    for name in ("mlflow_runs.png", "analysis_figure.png"):
        print(f"wrote docs/{name} ({(DOCS / name).stat().st_size // 1024} KB)")
    return 0


def run(*command: str, env: dict[str, str], cwd: Path) -> None:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_small_sweep(work: Path) -> str:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    if (work / "mlflow.db").exists():
        return uri
    print("running the quickstart's six register counts (one size, one length) ...", flush=True)
    run(sys.executable, "-m", "orchestrator.sweep", str(ROOT / "sweeps" / "quickstart.yaml"), *SWEEP_OVERRIDES,
        "--set", f"storage={work / 'ray_results'}", env={"MLFLOW_TRACKING_URI": uri}, cwd=work)
    return uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class mlflow_ui:
    """`mlflow ui` on loopback for the length of a with-block, in a process group of its own."""

    def __init__(self, uri: str, work: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        mlflow = Path(sys.executable).with_name("mlflow")
        self.log = open(work / "mlflow-ui.log", "w")
        self.process = subprocess.Popen(
            [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
             "--workers", "1"],
            cwd=work, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def __enter__(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mlflow ui exited ({self.process.returncode}); see its log")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5).close()
                return self.url
            except OSError:
                time.sleep(1)
        raise SystemExit(f"mlflow ui at {self.url} did not answer in 120 s")

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def screenshot_runs(uri: str, ui: str, experiment: str, out: Path, work: Path) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from orchestrator.stores.mlflow_ui import runs_view_url

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    parent = client.search_runs(
        [found.experiment_id], "tags.`sweep.role` = 'parent'", order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    url = runs_view_url(uri, found.experiment_id, ui=ui)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url)
            row = page.locator("[role=row][row-index]").filter(has_text=parent.info.run_name).first
            row.wait_for()
            for name in ("Close",):  # MLflow 3's assistant panel squeezes the table
                button = page.get_by_role("button", name=name, exact=True)
                if button.count() == 1 and button.is_visible():
                    button.click()
            row.locator('[col-id="attributes.`Run Name`"] button').first.click()
            page.locator('[role=row][row-index="1"]').first.wait_for()
            page.wait_for_timeout(1500)  # cells fill in
            box = page.locator(".ag-root-wrapper").first.bounding_box()
            # Up to the second metric column (README width), the header and the rows, not the space below.
            last = page.locator(f'[role=columnheader][col-id="metrics.`{LAST_METRIC}`"]').first.bounding_box()
            right = min(box["x"] + box["width"], last["x"] + last["width"]) if last else box["x"] + box["width"]
            rows = page.locator("[role=row][row-index]")
            bottom = max(b["y"] + b["height"] for b in (rows.nth(i).bounding_box() for i in range(rows.count())) if b)
            height = min(box["height"], bottom - box["y"] + 1)
            page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
            page.mouse.move(0, 0)
            page.screenshot(path=str(out), clip={"x": box["x"], "y": box["y"], "width": right - box["x"], "height": height})
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
