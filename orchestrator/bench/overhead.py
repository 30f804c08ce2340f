"""Orchestration overhead: N short trainings through the sweep against the same N bare.

Bare: a pool of `parallel` fresh (spawned) worker processes runs Trainer.fit with a
tracker that only notes when losses are logged (LogClock), one CPU thread each
(OMP_NUM_THREADS=1, as Ray sets it for a trial with resources cpu: 1). Sweep: the
same trainings (same config, seeds 0..N-1) as a generated spec run by
`python -m orchestrator.sweep` in a subprocess, MLflow logging to a temporary SQLite
store, probes at the default cadence, `parallel` trials at a time. The ratio of the two
wall times is the overhead; the MLflow run timestamps say where it goes (timeline.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Mapping

import yaml

from orchestrator.bench.timeline import mean_ms, median_step_s, sweep_timeline
from trainers.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from trainers.probes import names

REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEP_NAME = "bench-overhead"
CPUS_PER_TRIAL = 1


@dataclass(frozen=True)
class OverheadSettings:
    trials: int = 8
    seconds: float = 15.0
    steps: int | None = None  # None: calibrated so that one training takes about `seconds`
    parallel: int | None = None  # None: one training per CPU core, as the sweep packs cpu: 1 trials
    repeat: int = 1  # pairs of (bare, sweep), alternating which goes first; the median pair reported
    profile: bool = False
    keep: bool = False


def bench_train_config(steps: int, seed: int = 0) -> TrainConfig:
    """A CPU-sized trial like sweeps/quickstart.yaml: eval (and checkpoint) halfway and at the end."""
    return TrainConfig(
        model=ModelConfig(size="micro", img_size=32, patch_size=4, num_registers=4),
        data=DataConfig(name="shapes", num_classes=6, train_size=4096, val_size=256),
        optim=OptimConfig(lr=1e-3, batch_size=32, warmup_steps=min(10, steps // 4)),
        steps=steps,
        eval_every=max(1, steps // 2),
        log_every=min(10, steps),
        seed=seed,
    )


def calibrate_steps(seconds: float) -> int:
    """Steps of bench_train_config that take about `seconds` on one thread of this machine now."""
    import torch

    from trainers.loop import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(CPUS_PER_TRIAL)
    try:
        trainer = Trainer(bench_train_config(steps=1000), torch.device("cpu"))
        batches = trainer.data.train_batches(0, trainer.cfg.optim.batch_size)
        for _ in range(3):
            trainer.train_step(next(batches))
        start = time.perf_counter()
        for _ in range(10):
            trainer.train_step(next(batches))
        per_step = (time.perf_counter() - start) / 10
    finally:
        torch.set_num_threads(threads)
    return max(10, int(round(seconds / per_step / 10)) * 10)


# ----------------------------------------------------------------- bare


class LogClock:
    """A Tracker that keeps only when each training-loss window was logged: the bare side's
    training pace, read like the sweep's from MLflow metric timestamps."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if names.TRAIN_LOSS in metrics:
            self.stamps.append((step, time.time()))

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        pass


def bare_training(cfg_json: str) -> dict[str, Any]:
    """One training in a pool worker. Wall-clock stamps, comparable with the sweep's MLflow times."""
    started = time.time()
    # As Ray sets it in a worker for a cpu: 1 actor, before torch sizes its thread pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(CPUS_PER_TRIAL))
    import torch

    from trainers.loop import Trainer

    torch.set_num_threads(CPUS_PER_TRIAL)
    imported = time.time()
    clock = LogClock()
    Trainer(TrainConfig.model_validate_json(cfg_json), torch.device("cpu")).fit(clock)
    return {
        "start": imported,
        "end": time.time(),
        "import_s": imported - started,
        "step_s": median_step_s(clock.stamps),
        "first_log": clock.stamps[0][1] if clock.stamps else None,
    }


def run_bare(configs: list[TrainConfig], parallel: int) -> dict[str, Any]:
    start = time.time()
    # Spawned, not forked: fresh interpreters that import torch themselves, like Ray's workers.
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(bare_training, [cfg.model_dump_json() for cfg in configs]))
    wall = time.time() - start
    durations = [r["end"] - r["start"] for r in rows]
    return {
        "wall_s": wall,
        "train_s_mean": sum(durations) / len(durations),
        "import_s_max": max(r["import_s"] for r in rows),
        "to_first_training_s": min(r["start"] for r in rows) - start,
        "to_first_log_s": min((r["first_log"] for r in rows if r["first_log"] is not None), default=start) - start,
        "after_last_training_s": start + wall - max(r["end"] for r in rows),
        "step_ms": mean_ms([r["step_s"] for r in rows]),
    }


# ----------------------------------------------------------------- sweep


def sweep_spec(cfg: TrainConfig, trials: int, parallel: int, storage: Path) -> dict[str, Any]:
    train = cfg.model_dump(mode="json")
    train.pop("seed")
    return {
        "name": SWEEP_NAME,
        "train": train,
        "seeds": list(range(trials)),
        "resources": {"cpu": CPUS_PER_TRIAL, "gpu": 0},
        "max_concurrent": parallel,
        "max_failures": 0,
        "storage": str(storage),
    }


def sweep_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env


def run_sweep(cfg: TrainConfig, trials: int, parallel: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(sweep_spec(cfg, trials, parallel, workdir / "ray_results"), sort_keys=False))
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec_path)],
        cwd=workdir, env=sweep_env(workdir), capture_output=True, text=True,
    )
    end = time.time()
    if done.returncode != 0:
        raise RuntimeError(
            f"the benchmark sweep failed (exit {done.returncode}); its output:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return {"wall_s": end - start, **sweep_timeline(f"sqlite:///{workdir / 'mlflow.db'}", SWEEP_NAME, start, end, parallel)}


# ----------------------------------------------------------------- profile of the pieces alone


def time_python(code: str) -> float:
    """Wall seconds of a fresh interpreter running `code` (imports included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=sweep_env(Path(tempfile.gettempdir())))
    return time.perf_counter() - start


def profile_pieces() -> dict[str, float]:
    return {
        "python_bare_s": time_python("pass"),
        "import_trainer_s": time_python("import trainers.loop"),
        "import_trial_worker_s": time_python("import orchestrator.trials.trainable"),
        "import_sweep_driver_s": time_python("import orchestrator.launch.run"),
        "ray_init_shutdown_s": time_python("import ray; ray.init(include_dashboard=False); ray.shutdown()"),
    }


# ----------------------------------------------------------------- the benchmark


def pair_order(index: int) -> tuple[str, str]:
    """bare then sweep, then sweep then bare, ...: a drift in the machine's speed over the
    run (other tenants, thermal) favours neither side once there are two pairs."""
    return ("bare", "sweep") if index % 2 == 0 else ("sweep", "bare")


def summarize_pairs(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pair with the median ratio (of two middle pairs, the lower) gives the walls and the
    breakdown, so that the reported walls, ratio and extra seconds describe one real pair. Medians
    of each side's walls would not: on a drifting machine they come from different pairs, and
    their ratio can sit far from the median ratio. Every pair's breakdown is kept too."""
    ratios = [p["sweep"]["wall_s"] / p["bare"]["wall_s"] for p in pairs]
    median_pair = pairs[sorted(range(len(pairs)), key=ratios.__getitem__)[(len(pairs) - 1) // 2]]
    bare_wall, sweep_wall = median_pair["bare"]["wall_s"], median_pair["sweep"]["wall_s"]
    return {
        "bare_wall_s": bare_wall,
        "sweep_wall_s": sweep_wall,
        "ratio": sweep_wall / bare_wall,
        "ratios": ratios,
        "pairs": pairs,  # each side's full breakdown, to tell a slow start-up from slow trials
        "extra_s": sweep_wall - bare_wall,
        "bare": median_pair["bare"],
        "sweep": median_pair["sweep"],
    }


def run_overhead_bench(settings: OverheadSettings) -> dict[str, Any]:
    parallel = settings.parallel or os.cpu_count() or 1
    steps = settings.steps or calibrate_steps(settings.seconds)
    configs = [bench_train_config(steps, seed) for seed in range(settings.trials)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        sides = {
            "bare": lambda index: run_bare(configs, parallel),
            "sweep": lambda index: run_sweep(configs[0], settings.trials, parallel, workdir / f"sweep-{index}"),
        }
        pairs = [{side: sides[side](index) for side in pair_order(index)} for index in range(settings.repeat)]
        result: dict[str, Any] = {
            "benchmark": "overhead",
            "trials": settings.trials,
            "parallel": parallel,
            "steps": steps,
            "repeat": settings.repeat,
            "config": configs[0].model_dump(mode="json", exclude={"seed"}),
            "load_avg_1m": os.getloadavg()[0],
            **summarize_pairs(pairs),
        }
        if settings.profile:
            result["pieces"] = profile_pieces()
        if settings.keep:
            result["workdir"] = str(workdir)
        return result
    finally:
        if not settings.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def format_ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f} ms"


def row(label: str, value: str) -> str:
    return f"  {label:<62}{value}"


def format_s(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


def format_overhead_result(r: dict[str, Any]) -> str:
    b, s = r["bare"], r["sweep"]
    ratios = r["ratios"]  # one per pair, from summarize_pairs
    lines = [f"{r['trials']} trainings of {r['steps']} steps, {r['parallel']} at a time (load average {r['load_avg_1m']:.1f})"]
    if len(ratios) > 1:
        lines.append("pair  first   bare s  sweep s  ratio  first log s sweep/bare  ms/step sweep/bare")
        for index, (pair, ratio) in enumerate(zip(r["pairs"], ratios)):
            bare, sweep = pair["bare"], pair["sweep"]
            lines.append(
                f"{index + 1:4d}  {pair_order(index)[0]:<5} {bare['wall_s']:7.1f}  {sweep['wall_s']:7.1f}  "
                f"{ratio:5.2f}  {format_s(sweep['to_first_log_s'])} / {format_s(bare['to_first_log_s']).strip():<12} "
                f"{format_ms(sweep['step_ms']).strip()} / {format_ms(bare['step_ms']).strip()}"
            )
        lines.append("the pair with the median ratio:")
    lines += [
        f"bare pool  {r['bare_wall_s']:7.1f} s   (first training starts after {b['to_first_training_s']:.1f} s,"
        f" one training {b['train_s_mean']:.1f} s)",
        f"sweep      {r['sweep_wall_s']:7.1f} s   ratio {r['ratio']:.2f} ({r['extra_s']:+.1f} s)",
        "where the sweep's time goes:",
        row("start to MLflow parent run (imports, spec, preflight)", f"{s['driver_start_s']:6.1f} s"),
        row("parent run to first trial start (Ray, Tune, worker boot)", f"{s['to_first_trial_s']:6.1f} s"),
        row(
            f"start to first training-loss window (start-up + {r['config']['log_every']} steps)",
            f"{format_s(s['to_first_log_s']):>6} s   (bare: {format_s(b['to_first_log_s']).strip()} s)",
        ),
        row(
            "one trial run (first ones: torch and timm imports too)",
            f"{s['trial_s_mean']:6.1f} s   (bare: {b['train_s_mean']:.1f} s)",
        ),
        row(
            "training pace, median ms per step",
            f"{format_ms(s['step_ms'])}   (bare: {format_ms(b['step_ms']).strip()})",
        ),
        row("gap between trials on a slot (mean)", f"{s['gap_s_mean']:6.1f} s"),
        row("last trial end to exit (Tune, Ray shutdown)", f"{s['after_last_trial_s']:6.1f} s"),
    ]
    if s.get("probe_s_mean") is not None:
        lines.append(row("probes inside one trial (also in bare)", f"{s['probe_s_mean']:6.1f} s"))
    for name, seconds in r.get("pieces", {}).items():
        lines.append(f"  alone: {name:<40} {seconds:6.1f} s")
    if "workdir" in r:
        lines.append(f"kept: {r['workdir']}")
    return "\n".join(lines)

