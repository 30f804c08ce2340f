"""Benchmark: how long does reading a large sweep back from a SQLite store take?

    python -m orchestrator.analyze.bench_load --runs 1000

Fills a temporary SQLite store with `--runs` finished trials (each with a realistic number of
metric points: every probe step logs the outlier fraction of every block and the output, the
other detector, top-1, loss, mIoU, CorLoc and attention statistics), then times `load_sweep`
and the computations that follow it. Filling uses one log_batch per run; the store goes to
/dev/shm when there is one, because SQLite's per-commit fsync otherwise dominates the filling
(the timed read does not depend on it).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.analyze.emergence import emergence_points
from orchestrator.analyze.load import load_sweep
from orchestrator.analyze.registers import best_counts, register_stats
from trainers.config import MODEL_SIZES
from trainers.probes import names

SIZES = ("tiny", "small", "base")
REGISTERS = (0, 1, 2, 4, 8, 16)
STEPS = 1000
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def run_metrics(size: str, regs: int, probe_steps: int, rng: np.random.Generator) -> list[Metric]:
    depth = MODEL_SIZES[size][1]
    keys = [names.outlier_frac(names.block(b)) for b in range(depth)]
    keys += [names.outlier_frac(names.OUTPUT), names.outlier_frac(names.OUTPUT, "abs")]
    keys += [names.VAL_TOP1, names.VAL_LOSS, names.TRAIN_LOSS, names.SEG_MIOU, names.CORLOC]
    keys += [names.attn("entropy", "cls"), names.attn("tv", "cls"), names.norm_stat("max_over_median", "patch", names.OUTPUT)]
    metrics = []
    for i in range(1, probe_steps + 1):
        step = i * STEPS // probe_steps
        values = rng.random(len(keys)) * (0.05 if regs == 0 else 0.005)
        metrics += [Metric(k, float(v), 1_700_000_000_000 + step, step) for k, v in zip(keys, values)]
    return metrics


def fill_store(uri: str, runs: int, probe_steps: int, experiment: str = "bench") -> int:
    """Create `runs` finished trials under one parent; returns the number of metric points written."""
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, tags={"sweep.role": "parent", "sweep.name": experiment}).info.run_id
    rng = np.random.default_rng(0)
    settings = itertools.cycle(itertools.product(SIZES, REGISTERS))
    points = 0
    for index in range(runs):
        size, regs = next(settings)
        seed = index // (len(SIZES) * len(REGISTERS))
        tags = {
            "mlflow.parentRunId": parent,
            "sweep.role": "trial",
            "sweep.name": experiment,
            "trial_id": f"t{index:05d}",
            "axis.model_size": size,
            "axis.num_registers": str(regs),
            "axis.steps": str(STEPS),
            "axis.seed": str(seed),
        }
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        metrics = run_metrics(size, regs, probe_steps, rng)
        params = [Param("model.size", size), Param("model.num_registers", str(regs)), Param("steps", str(STEPS))]
        for start in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + MAX_BATCH], params=params if start == 0 else [])
        client.set_terminated(run_id, "FINISHED")
        points += len(metrics)
    client.set_terminated(parent, "FINISHED")
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.analyze.bench_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--probe-steps", type=int, default=10, help="probe evaluations per run")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the temporary store (default: /dev/shm or /tmp)")
    args = parser.parse_args(argv)
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    folder = Path(tempfile.mkdtemp(prefix="bench-load-", dir=base))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        start = time.perf_counter()
        points = fill_store(uri, args.runs, args.probe_steps)
        print(f"filled {args.runs} runs, {points} metric points in {time.perf_counter() - start:.1f} s ({uri})")
        start = time.perf_counter()
        sweep = load_sweep("bench", uri)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        emergence_points(sweep, 0.01)
        best_counts(register_stats(sweep))
        computed = time.perf_counter() - start
        print(
            f"load_sweep: {len(sweep.trials)} trials, {len(sweep.history)} metric points in {loaded:.2f} s; "
            f"emergence + register statistics in {computed:.2f} s"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
