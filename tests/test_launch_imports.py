"""What the sweep driver and the trial workers import, and in which thread: each launch's start-up time depends on it
(docs/performance.md). Every check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = "orchestrator.sweep, orchestrator.spec.plan, orchestrator.launch.run, orchestrator.launch.preflight"


def modules_imported_by(code: str, tmp_path: Path) -> set[str]:
    """Modules that `code` imports on top of the driver's own and launch.IMPORTED_BY_BOTH."""
    script = (
        f"import importlib, json, sys\nimport {DRIVER}\n"
        "from orchestrator.launch.run import IMPORTED_BY_BOTH\n"
        "for name in IMPORTED_BY_BOTH:\n    importlib.import_module(name)\n"
        "before = set(sys.modules)\n"
        f"{code}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_driver_imports_neither_torch_nor_mlflow_before_ray_starts(tmp_path: Path) -> None:
    # torch and timm are the trial workers' business (seconds to import); MLflow is imported by
    # the thread that runs beside Ray's start, so it must not be imported before.
    script = f"import sys, {DRIVER}\nprint(sorted(m for m in ('torch', 'timm', 'torchvision', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ray_start_and_the_mlflow_thread_never_import_the_same_module(tmp_path: Path) -> None:
    # They run at once (launch.run_sweep); a module both import would be imported by two threads
    # at a time, which can deadlock. Anything they share belongs in launch.IMPORTED_BY_BOTH.
    mlflow_thread = modules_imported_by(
        "from orchestrator.launch.run import find_launch, open_mlflow_side\n"
        "from orchestrator.spec.plan import format_plan, make_plan\n"
        "from orchestrator.spec.schema import load_spec\n"
        f"spec = load_spec('sweeps/quickstart.yaml', ['storage={tmp_path / 'ray_results'}'])\n"
        "plan = make_plan(spec)\n"
        "open_mlflow_side(find_launch(spec, plan, format_plan(plan), [], None))",
        tmp_path,
    )
    ray_start = modules_imported_by(
        "import ray\nfrom orchestrator.launch.run import init_ray\nassert init_ray()\nray.shutdown()", tmp_path
    )
    assert "mlflow.tracking" in mlflow_thread and "orchestrator.launch.tuner" in mlflow_thread
    assert ray_start, "ray.init imported nothing new: the check would be empty"
    shared = sorted(mlflow_thread & ray_start)
    assert shared == [], f"add to launch.IMPORTED_BY_BOTH: {shared}"


def test_trial_workers_import_no_mlflow() -> None:
    # A trial worker loads the trainable (and the trainer it imports) and nothing of MLflow:
    # MLflow and its SQLAlchemy store cost each worker about 3 CPU-seconds before its first
    # step. What a trial measures goes to the driver with its reports (orchestrator/trials/records.py).
    script = (
        "import sys, orchestrator.trials.trainable, trainers.loop\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'sqlalchemy', 'alembic')))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
