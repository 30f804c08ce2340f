"""What the sweep driver and the trial workers import, and in which thread: each launch's start-up time depends on it
(docs/performance.md). Every check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = "orchestrator.sweep, orchestrator.spec.plan, orchestrator.launch.run, orchestrator.launch.preflight"


def test_the_driver_imports_neither_torch_nor_mlflow_before_ray_starts(tmp_path: Path) -> None:
    # torch and timm are the trial workers' business (seconds to import); MLflow is imported by
    # the thread that runs beside Ray's start, so it must not be imported before.
    script = f"import sys, {DRIVER}\nprint(sorted(m for m in ('torch', 'timm', 'torchvision', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_concurrent_imports_in_opposite_orders_raise_a_race_instead_of_hanging(tmp_path: Path) -> None:
    # The premise of launch.run.start_ray_beside_mlflow: when two threads import modules that
    # import each other in opposite orders, CPython never hangs: it lets one thread go on with
    # the other's partially initialised module, and the imports fail with errors that the
    # launch takes for a race (and redoes that side alone).
    for name, other in (("race_a", "race_b"), ("race_b", "race_a")):
        (tmp_path / f"{name}.py").write_text(f"import time\ntime.sleep(0.5)\nfrom {other} import VALUE\nVALUE = 1\n")
    script = (
        "import importlib, sys, threading\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from orchestrator.launch.run import may_be_import_race\n"
        "errors = []\n"
        "def load(name):\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as error:\n        errors.append(error)\n"
        "threads = [threading.Thread(target=load, args=(n,)) for n in ('race_a', 'race_b')]\n"
        "[t.start() for t in threads]\n[t.join() for t in threads]\n"
        "print(len(errors) > 0 and all(may_be_import_race(e) for e in errors))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_a_side_that_lost_an_import_race_is_done_again_alone(monkeypatch) -> None:
    from orchestrator.launch import run

    deadlock = RuntimeError("deadlock detected by _ModuleLock('opentelemetry.trace') at 1")
    calls = {"ray": 0, "store": 0, "shutdown": 0}

    def init_ray(verbose: bool) -> bool:
        calls["ray"] += 1
        if calls["ray"] == 1:
            raise deadlock
        return True

    def open_store(launch) -> str:
        calls["store"] += 1
        if calls["store"] == 1:
            raise ImportError("cannot import name 'X' from partially initialized module 'mlflow.y'")
        return "client"

    import ray

    monkeypatch.setattr(run, "init_ray", init_ray)
    monkeypatch.setattr(run, "open_mlflow_store", open_store)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    assert run.start_ray_beside_mlflow(launch=None, verbose=False) == (True, "client")
    assert calls == {"ray": 2, "store": 2, "shutdown": 1}

    # Any other error is the user's to see, and a Ray this call started is stopped.
    monkeypatch.setattr(run, "init_ray", lambda verbose: True)
    monkeypatch.setattr(run, "open_mlflow_store", lambda launch: (_ for _ in ()).throw(ValueError("bad store")))
    try:
        run.start_ray_beside_mlflow(launch=None, verbose=False)
    except ValueError as error:
        assert str(error) == "bad store"
    else:
        raise AssertionError("the store's error was swallowed")
    assert calls["shutdown"] == 2


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
