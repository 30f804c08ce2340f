"""Shared pieces of the end-to-end tests: a tiny sweep spec and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "e2e",
        "train": {
            "model": {"size": "micro", "img_size": 16, "patch_size": 4, "num_registers": 0},
            "data": {"name": "shapes", "num_classes": 3, "train_size": 64, "val_size": 16},
            "optim": {"lr": 1.0e-3, "batch_size": 8, "warmup_steps": 1},
            "probe": {"every": 0, "at_end": True, "batch_size": 8},
            "steps": 4,
            "eval_every": 2,
            "log_every": 2,
        },
        "grid": {"model.num_registers": [0, 2]},
        "seeds": [0],
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 1,
        "storage": str(tmp_path / "ray_results"),
    }
    spec.update(overrides)
    return spec


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    env.update(extra)
    return env


def run_sweep_cli(tmp_path: Path, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", *args],
        cwd=tmp_path,
        env=sweep_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
