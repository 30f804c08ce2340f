"""What opening MLflow beside Ray's start saves per launch (orchestrator/launch/run.py).

Each measurement is a fresh interpreter that loads the driver as the CLI does, then times
Ray's start plus MLflow's import and a new SQLite store: either together
(`start_ray_beside_mlflow`, as a launch does) or one after the other. Pairs alternate which
mode goes first, so a drift in the machine's speed favours neither.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = ("beside", "serial")

_CHILD = """
import json, os, sys, time
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + sys.argv[2] + "/mlflow.db"
os.environ.pop("RAY_ADDRESS", None)
from orchestrator.launch import run
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import load_spec
spec = load_spec("sweeps/quickstart.yaml", ["storage=" + sys.argv[2] + "/ray_results"])
plan = make_plan(spec)
launch = run.find_launch(spec, plan, format_plan(plan), [], None)
start = time.perf_counter()
if sys.argv[1] == "beside":
    run.start_ray_beside_mlflow(launch, verbose=False)
else:
    run.init_ray()
    run.open_mlflow_store(launch)
seconds = time.perf_counter() - start
import ray
ray.shutdown()
print(json.dumps({"seconds": seconds}))
"""


def measure_once(mode: str, repo: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, folder], cwd=repo, capture_output=True, text=True, timeout=300, check=True
        )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def run_startup_bench(repeat: int) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    pairs = []
    for index in range(repeat):
        order = MODES if index % 2 == 0 else MODES[::-1]
        seconds = {mode: measure_once(mode, repo) for mode in order}
        pairs.append({"first": order[0], **seconds, "saved": seconds["serial"] - seconds["beside"]})
    return {"pairs": pairs, "median_saved_s": statistics.median(p["saved"] for p in pairs)}


def format_startup_result(result: dict[str, Any]) -> str:
    lines = ["pair  first   beside_s  serial_s  saved_s"]
    for i, pair in enumerate(result["pairs"]):
        lines.append(f"{i:>4}  {pair['first']:<6}  {pair['beside']:>8.2f}  {pair['serial']:>8.2f}  {pair['saved']:>7.2f}")
    lines.append(f"median saved per launch: {result['median_saved_s']:.2f} s")
    return "\n".join(lines)
