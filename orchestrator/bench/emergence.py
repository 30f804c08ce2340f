"""What the emergence watch and adaptive probing cost: a sweep spec's trials trained three ways.

Each chosen trial of the spec (the quickstart by default) trains in-process on one CPU thread, as
a trial runs under Ray with `cpu: 1`, with its probes as the spec has them and the watch

* off (`probe.monitor: false`): the probes alone, the baseline;
* on, regular probes only (`probe.adaptive: false`);
* on with adaptive probing (`probe.adaptive: true`): weight snapshots every every/8 steps while no
  suspicion is open, adaptive probes while one is.

The three variants of a trial run back to back, in an order that rotates between trials and
repeats, so a machine that slows down for a while hurts all three alike. Both the wall time and
the process CPU time (which another process on a shared machine does not inflate) are summed
per variant; the ratios are against the baseline. The same training is done three times: the
trajectory is identical (tests/test_emergence_training.py), only the watch's work differs. One
untimed training first pays the imports (matplotlib for the final figures) and warm-up.

The quickstart's models grow no artifacts, so no suspicion opens and no adaptive probe runs
there; what one would cost is measured apart, on the first trial's trained model: a training
step, a regular probe, an adaptive probe and a weight snapshot, each the median of a few runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, bool]] = {
    "probes only": {"monitor": False, "adaptive": False},
    "watch": {"monitor": True, "adaptive": False},
    "watch + adaptive": {"monitor": True, "adaptive": True},
}
DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml"


@dataclass
class VariantTotals:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    trainings: int = 0
    snapshots: int = 0
    adaptive_probes: int = 0
    flagged_trials: list[str] = field(default_factory=list)


def chosen_trials(spec_path: Path, which: str) -> list[Any]:
    """The plan's trials: all of them, or ('longest') each size's at the longest length, fewest and most registers."""
    from orchestrator.spec.plan import make_plan
    from orchestrator.spec.schema import load_spec

    plan = make_plan(load_spec(spec_path))
    if which == "all":
        return list(plan.trials)
    longest = max(t.config.steps for t in plan.trials)
    counts = sorted({t.config.model.num_registers for t in plan.trials})
    ends = {counts[0], counts[-1]}
    seed = plan.spec.seeds[0]
    return [
        t for t in plan.trials
        if t.config.steps == longest and t.config.model.num_registers in ends and t.config.seed == seed
    ]


def run_emergence_bench(spec_path: Path = DEFAULT_SPEC, which: str = "longest", repeat: int = 1) -> dict[str, Any]:
    import torch

    from trainers.loop import Trainer

    trials = chosen_trials(spec_path, which)
    totals = {name: VariantTotals() for name in VARIANTS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        warm = Trainer(trials[0].config, torch.device("cpu"))
        warm.fit()
        unit_costs = measure_unit_costs(warm)
        order = list(VARIANTS)
        for round_ in range(repeat):
            for index, trial in enumerate(trials):
                shift = (index + round_) % len(order)
                for name in order[shift:] + order[:shift]:
                    cfg = trial.config.model_copy(
                        update={"probe": trial.config.probe.model_copy(update=VARIANTS[name])}
                    )
                    wall, cpu = time.perf_counter(), time.process_time()
                    trainer = Trainer(cfg, torch.device("cpu"))
                    trainer.fit()
                    total = totals[name]
                    total.wall_s += time.perf_counter() - wall
                    total.cpu_s += time.process_time() - cpu
                    total.trainings += 1
                    total.snapshots += trainer.watch.snapshots_taken
                    total.adaptive_probes += trainer.watch.adaptive_probes
                    if trainer.watch.monitor.observations and trainer.watch.monitor.status() != "none":
                        total.flagged_trials.append(f"trial {trial.index}")
    finally:
        torch.set_num_threads(threads)
    base = totals["probes only"]
    return {
        "spec": str(spec_path),
        "trials": len(trials),
        "repeat": repeat,
        "variants": {name: vars(t) for name, t in totals.items()},
        "ratio_wall": {name: t.wall_s / base.wall_s for name, t in totals.items()},
        "ratio_cpu": {name: t.cpu_s / base.cpu_s for name, t in totals.items()},
        "unit_costs_ms": unit_costs,
    }


def measure_unit_costs(trainer: Any, repeats: int = 5) -> dict[str, float]:
    """Milliseconds (median of `repeats`) of a training step, a regular probe (no figures), an
    adaptive probe and a weight snapshot, on this trainer's model and probe batch."""
    import statistics

    from trainers.emergence.measure import output_artifacts
    from trainers.emergence.snapshots import WeightSnapshots
    from trainers.probes.report import run_probes

    cfg = trainer.cfg
    probe_batch = trainer.data.probe_batch(cfg.probe.batch_size)
    batch = next(iter(trainer.data.train_batches(0, cfg.optim.batch_size)))
    snapshots = WeightSnapshots()

    def timed(work: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    def snapshot() -> None:
        snapshots.take(0, trainer.objective.probe_model)
        snapshots.drop_through(0)  # as the window rolls on: the next copy reuses the buffers

    model = trainer.objective.probe_model
    return {
        "training step": timed(lambda: trainer.train_step(batch)),
        "regular probe": timed(lambda: run_probes(model, probe_batch, cfg.probe, figures=False)),
        "adaptive probe": timed(lambda: output_artifacts(model, probe_batch.images)),
        "weight snapshot": timed(snapshot),
    }


def format_emergence_result(result: dict[str, Any]) -> str:
    lines = [
        f"Emergence watch overhead: {result['trials']} trials of {result['spec']}, x{result['repeat']}, each trained "
        "three ways on one CPU thread",
        f"  {'variant':<18} {'wall s':>8} {'CPU s':>8} {'wall ratio':>10} {'CPU ratio':>10} {'snapshots':>9} {'adaptive':>8}",
    ]
    for name, t in result["variants"].items():
        lines.append(
            f"  {name:<18} {t['wall_s']:>8.1f} {t['cpu_s']:>8.1f} {result['ratio_wall'][name]:>10.3f} "
            f"{result['ratio_cpu'][name]:>10.3f} {t['snapshots']:>9} {t['adaptive_probes']:>8}"
        )
    flagged = sorted({f for t in result["variants"].values() for f in t["flagged_trials"]})
    lines.append("  flagged: " + (", ".join(flagged) if flagged else "no trial (no adaptive probe ran)"))
    costs = result["unit_costs_ms"]
    step = costs["training step"]
    lines.append(
        "  one of each, first trial's model: "
        + ", ".join(f"{name} {ms:.1f} ms ({ms / step:.2f} steps)" for name, ms in costs.items())
    )
    return "\n".join(lines)
