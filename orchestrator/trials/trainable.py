"""The Ray Tune trainable: a thin adapter between Tune's config dict and trainers/.

It builds the typed TrainConfig, restores the checkpoint Tune hands back after a failure
or a resumed sweep, runs the loop, and reports to Tune at every checkpoint point, with the
latest value of every metric (orchestrator/trials/reporting.py). It never
touches MLflow: what the trial measures rides along with each report (orchestrator/trials/records.py)
and the driver's callback writes it to the trial's one MLflow run (orchestrator/trials/mlflow_logger.py).
Workers therefore import no MLflow; tests/test_launch_imports.py checks it.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
from typing import Any, Mapping, Sequence

from ray import tune

from orchestrator.spec.dotted import set_dotted
from orchestrator.stores.axes import AXIS_OBJECTIVE, AXIS_REGISTERS, AXIS_SEED, AXIS_SIZE, AXIS_STEPS, axis_tag
from orchestrator.trials.records import (
    RECORDS_KEY,
    RESTORED_TAG,
    WORKER_HOST_TAG,
    WORKER_PID_TAG,
    RecordBuffer,
)
from orchestrator.trials.reporting import REPORTED_METRICS_FILE, LatestMetrics, measure_missing  # noqa: F401
from trainers.config import TrainConfig

# Tune config layout, written by orchestrator/launch/tuner.py:
#   {"train": <base TrainConfig as a dict>, "trial": {"index": i, "axes": {dotted.path: value}}}
# After an attempt diverged, the driver's callback adds the error's message under
# "trial" -> DIVERGED_KEY before Tune retries the trial (orchestrator/trials/mlflow_logger.py).
DIVERGED_KEY = "diverged"

NUM_CLASSES_TAG = "data.num_classes"  # read back by orchestrator/analyze/learning.py


def trial_config(base: Mapping[str, Any], axes: Mapping[str, Any]) -> TrainConfig:
    tree = copy.deepcopy(dict(base))
    for path, value in axes.items():
        set_dotted(tree, path, value)
    return TrainConfig.model_validate(tree)


def axis_tags(cfg: TrainConfig, axes: Mapping[str, Any]) -> dict[str, str]:
    """One tag per axis: the four study axes on every run (swept or not, read from the config),
    plus every other swept key by its path (orchestrator/stores/axes.py)."""
    tags = {axis_tag(path): str(value) for path, value in axes.items()}
    tags.update(
        {
            AXIS_SIZE: cfg.model.label,
            AXIS_REGISTERS: str(cfg.model.num_registers),
            AXIS_STEPS: str(cfg.steps),
            AXIS_SEED: str(cfg.seed),
            AXIS_OBJECTIVE: cfg.objective,
        }
    )
    return tags


def trial_label(axes: Mapping[str, Any], index: int) -> str:
    """Readable run name: t003-objective=dino-model.size=mini-model.num_registers=4 -> t003-dino-mini-r4."""
    short = {"objective": "", "model.size": "", "model.num_registers": "r", "steps": "s", "seed": "seed"}
    parts = [f"t{index:03d}"]
    for path, value in axes.items():
        prefix = short.get(path, path.rsplit(".", 1)[-1] + "=")
        parts.append(f"{prefix}{value:.3g}" if isinstance(value, float) else f"{prefix}{value}")
    return "-".join(parts)


def trial_device() -> Any:
    """CUDA only when Ray gave this trial a GPU or a fraction of one (it then sets
    CUDA_VISIBLE_DEVICES to that GPU). Ray leaves CUDA_VISIBLE_DEVICES alone for gpu: 0
    trials, so torch alone would put a CPU trial on a GPU that was given to another."""
    import ray
    import torch

    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def run_trial(config: dict[str, Any], report_metrics: Sequence[str] = ()) -> None:
    """One trial in one process. report_metrics: what the sweep's search and scheduler read
    from every report (orchestrator/launch/tuner.py passes them with tune.with_parameters)."""
    # torch and timm load here, in the trial's worker, not in the driver that only pickles this function.
    from trainers.loop import NonFiniteLossError, Trainer

    diverged = config["trial"].get(DIVERGED_KEY)
    if diverged:
        # Same seed, same data: training again from the last checkpoint would diverge at
        # the same step. Tune's remaining retries end here, before a model is built.
        raise NonFiniteLossError(f"{diverged} (in an earlier attempt; not trained again)")

    cfg = trial_config(config["train"], config["trial"]["axes"])
    records = RecordBuffer()
    records.set_tags({WORKER_PID_TAG: str(os.getpid()), WORKER_HOST_TAG: socket.gethostname()})
    trainer = Trainer(cfg, trial_device())
    # Chance level for the analysis: 1 / the classes of the data actually loaded.
    records.set_tags({NUM_CLASSES_TAG: str(trainer.data.num_classes)})
    tracker = LatestMetrics(records)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
            tracker = LatestMetrics(records, LatestMetrics.saved(directory))
        records.set_tags({RESTORED_TAG: str(trainer.step)})
        if trainer.step >= cfg.steps or trainer.watch.stopped:
            # The trial had finished (or stopped on emergence), but the driver was killed before
            # Tune's experiment state recorded it: report its result again instead of re-training.
            tune.report({**tracker.latest, **trainer.watch.report_values(), "step": trainer.step, RECORDS_KEY: records.take()})
            return

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        measure_missing(trainer, tracker, report_metrics)
        with tempfile.TemporaryDirectory() as directory:
            trainer.save(directory)
            tracker.save(directory)
            # The emergence watch's numbers ride along for the driver's console and pruner (trainers/emergence/keys.py).
            report = {**tracker.latest, **trainer.watch.report_values(), "step": step, RECORDS_KEY: records.take()}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))

    # A NonFiniteLossError ends the attempt like any error; the driver's callback marks the
    # trial diverged so that its retries stop at once, and records the reason.
    trainer.fit(tracker, on_checkpoint)
