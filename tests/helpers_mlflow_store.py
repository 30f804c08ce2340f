"""Fill an MLflow tracking store with one sweep in the project's MLflow layout.

The layout is the contract the orchestrator writes and the analysis reads
(see shared DESIGN.md): one experiment per sweep name, one parent run per
launch (tags sweep.role=parent, sweep.name), and exactly one nested child run
per trial (tags mlflow.parentRunId, sweep.role=trial, trial_id, git_commit,
axis.*), dotted params, and train/val metrics logged against the step.

Tests use it to get a realistic store without starting Ray or training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainers.probes.names import TRAIN_LOSS, VAL_LOSS, VAL_TOP1

DEFAULT_REGISTER_COUNTS: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
FAKE_GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class SeededSweep:
    """Ids of what write_sweep created, so a test can look them up."""

    sweep_name: str
    experiment_id: str
    parent_run_id: str
    parent_run_name: str
    # register count -> (run id, run name) of the trial that swept it
    trial_runs: dict[int, tuple[str, str]] = field(default_factory=dict)


def trial_run_name(model_size: str, num_registers: int, seed: int) -> str:
    """Run name a trial gets; it carries the register count so the UI shows it."""
    return f"{model_size}-reg{num_registers}-seed{seed}"


def _trial_metrics(num_registers: int, steps: int, timestamp_ms: int) -> list[Metric]:
    # Plausible curves: more registers -> slightly lower loss, higher accuracy.
    metrics: list[Metric] = []
    for step in range(steps):
        progress = (step + 1) / steps
        train_loss = 2.3 * (1.0 - 0.6 * progress) - 0.01 * num_registers
        metrics.append(Metric(TRAIN_LOSS, train_loss, timestamp_ms + step, step))
        metrics.append(Metric(VAL_LOSS, train_loss + 0.05, timestamp_ms + step, step))
        top1 = 0.1 + 0.5 * progress + 0.004 * num_registers
        metrics.append(Metric(VAL_TOP1, top1, timestamp_ms + step, step))
    return metrics


def write_sweep(
    tracking_uri: str,
    sweep_name: str = "num_registers_ui",
    register_counts: tuple[int, ...] = DEFAULT_REGISTER_COUNTS,
    model_size: str = "vit_tiny",
    steps: int = 5,
    seed: int = 0,
) -> SeededSweep:
    """Write one finished sweep launch (parent + one child per register count)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(sweep_name)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(sweep_name)
    )
    parent_run_name = f"{sweep_name}-launch"
    parent = client.create_run(
        experiment_id,
        run_name=parent_run_name,
        tags={"sweep.role": "parent", "sweep.name": sweep_name},
    )
    parent_id = parent.info.run_id
    trial_runs: dict[int, tuple[str, str]] = {}
    now_ms = int(time.time() * 1000)
    for index, num_registers in enumerate(register_counts):
        name = trial_run_name(model_size, num_registers, seed)
        trial_id = f"trial_{index:05d}"
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": parent_id,
                "sweep.role": "trial",
                "sweep.name": sweep_name,
                "trial_id": trial_id,
                "git_commit": FAKE_GIT_COMMIT,
                "axis.model_size": model_size,
                "axis.num_registers": str(num_registers),
                "axis.steps": str(steps),
                "axis.seed": str(seed),
                "axis.objective": "supervised",
            },
        )
        params = [
            Param("model.size", model_size),
            Param("model.num_registers", str(num_registers)),
            Param("optim.lr", "0.001"),
            Param("train.steps", str(steps)),
            Param("seed", str(seed)),
        ]
        client.log_batch(
            run.info.run_id,
            metrics=_trial_metrics(num_registers, steps, now_ms),
            params=params,
            tags=[RunTag("mlflow.note.content", f"{num_registers} registers")],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        trial_runs[num_registers] = (run.info.run_id, name)
    client.set_terminated(parent_id, "FINISHED")
    return SeededSweep(
        sweep_name=sweep_name,
        experiment_id=experiment_id,
        parent_run_id=parent_id,
        parent_run_name=parent_run_name,
        trial_runs=trial_runs,
    )
