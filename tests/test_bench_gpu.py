"""`python -m orchestrator.bench gpu`: the reduced form runs every part on the CPU (so the GPU
acceptance command cannot rot), and a part is stopped at its budget whatever it is doing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.bench.gpu import format_gpu_result, run_gpu_bench
from orchestrator.bench.gpu_parts import GpuBenchSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 minutes on 2 busy cores: 5 processes (4 parts, 2 DDP ranks) import torch
def test_the_reduced_form_measures_every_part_and_ends_in_one_json_line() -> None:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench", "gpu", "--ddp-backend", "gloo", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu" and result["reduced"] and result["wall_s"] <= result["budget_s"]
    parts = result["parts"]
    assert list(parts) == ["trainer", "pipeline", "objectives", "ddp"]
    for part in parts.values():
        assert "stopped" not in part and "error" not in part, part
        assert all("error" not in row and "skipped" not in row for row in part["rows"]), part["rows"]
    trainer = [row["item"] for row in parts["trainer"]["rows"]]
    assert len(trainer) == 8 and sum("compiled" in item for item in trainer) == 4
    assert {"r0", "r16"} <= {item.split()[2] for item in trainer}
    assert [row["decode"] for row in parts["pipeline"]["rows"]] == ["gpu", "cpu"]
    assert [row["item"].split()[0] for row in parts["objectives"]["rows"]] == ["supervised", "dino", "clip"]
    assert all(row["images_per_s"] > 0 for name in ("trainer", "pipeline", "objectives") for row in parts[name]["rows"])
    (ddp,) = parts["ddp"]["rows"]
    assert ddp["backend"] == "gloo" and [r["rank"] for r in ddp["ranks"]] == [0, 1] and ddp["step_s"] > 0
    print(f"bench gpu, reduced form: {wall:.0f} s wall")


def _slow_part(part: str, settings_json: str, device: str, deadline: float, ddp_backend: Any, out: Any) -> None:
    """A part whose second item never ends: one row, then it hangs."""
    out.put({"item": "quick", "images_per_s": 1.0})
    time.sleep(600)


def test_a_part_is_stopped_at_its_budget_and_keeps_what_it_measured() -> None:
    settings = GpuBenchSettings.reduced_form(budget_s=8.0)
    start = time.time()
    result = run_gpu_bench(settings, torch.device("cpu"), parts=("trainer",), target=_slow_part, grace_s=1.0)
    report = result["parts"]["trainer"]
    assert report["rows"] == [{"item": "quick", "images_per_s": 1.0}]
    assert "stopped" in report and time.time() - start < 8.0 + 15.0  # its share of 8 s, the grace and a kill
    assert "stopped" in format_gpu_result(result)


def test_the_full_run_plans_the_issues_matrix() -> None:
    s = GpuBenchSettings.full()
    assert (s.sizes, s.img, s.patch, s.registers, s.budget_s) == (("small", "base"), 224, 16, (0, 16), 480.0)
    assert set(s.objective_batches) == {"supervised", "dino", "clip"} and s.compile_backend == "inductor"
    from orchestrator.bench.gpu_parts import train_config
    from trainers.memory import estimate_memory

    for objective, batch in s.objective_batches.items():  # every objective's batch fits one H100
        cfg = train_config(s, objective=objective, size=s.objective_size, batch=batch)
        assert estimate_memory(cfg, 8, bf16=True).total < 60e9, objective
