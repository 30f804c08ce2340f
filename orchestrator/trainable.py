"""The Ray Tune trainable: a thin adapter between Tune's config dict and trainers/.

It builds the typed TrainConfig, reattaches to (or opens) the trial's one MLflow run,
restores the checkpoint Tune hands back after a failure or a resumed sweep, runs the
loop, and reports to Tune at every checkpoint point. A diverged trial marks its run
FAILED with the reason; Tune's retries of it stop at once.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.overrides import set_dotted
from orchestrator.tracking import DIVERGED_PREFIX, FAILURE_TAG, TrialRun, flatten
from trainers.config import TrainConfig
from trainers.probes import names

# Tune config layout, written by orchestrator/launch.py:
#   {"train": <base TrainConfig as a dict>, "trial": {"index": i, "axes": {dotted.path: value}},
#    "sweep": <SweepContext fields>}


@dataclass(frozen=True)
class SweepContext:
    """What every trial must know about its sweep (travels inside Tune's config)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str


# Where the current attempt runs (to find it on a cluster) and the step its checkpoint
# restored, if any: what a retry or a resumed sweep continued from.
WORKER_PID_TAG = "worker.pid"
WORKER_HOST_TAG = "worker.host"
RESTORED_TAG = "restored_from_step"


class TrialDivergedError(RuntimeError):
    """A retry of a trial that already diverged: the loss will be non-finite again, so stop."""


def trial_config(base: Mapping[str, Any], axes: Mapping[str, Any]) -> TrainConfig:
    tree = copy.deepcopy(dict(base))
    for path, value in axes.items():
        set_dotted(tree, path, value)
    return TrainConfig.model_validate(tree)


def axis_tags(cfg: TrainConfig, axes: Mapping[str, Any]) -> dict[str, str]:
    """The four study axes on every run (swept or not), plus every other swept key."""
    tags = {f"axis.{path}": str(value) for path, value in axes.items()}
    tags.update(
        {
            "axis.model_size": cfg.model.label,
            "axis.num_registers": str(cfg.model.num_registers),
            "axis.steps": str(cfg.steps),
            "axis.seed": str(cfg.seed),
        }
    )
    return tags


def trial_label(axes: Mapping[str, Any], index: int) -> str:
    """Readable run name: t003-model.size=mini-model.num_registers=4 -> t003-mini-r4."""
    short = {"model.size": "", "model.num_registers": "r", "steps": "s", "seed": "seed"}
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


def report_finished(run: TrialRun, steps: int) -> None:
    latest = run.latest_metrics()
    tune.report({key: latest[key] for key in (names.VAL_LOSS, names.VAL_TOP1) if key in latest} | {"step": steps})


def run_trial(config: dict[str, Any]) -> None:
    # torch and timm load here, in the trial's worker, not in the driver that only pickles this function.
    from trainers.loop import NonFiniteLossError, Trainer

    sweep = SweepContext(**config["sweep"])
    index, axes = config["trial"]["index"], config["trial"]["axes"]
    cfg = trial_config(config["train"], axes)
    context = tune.get_context()
    run = TrialRun.attach(
        MlflowClient(sweep.tracking_uri),
        experiment_id=sweep.experiment_id,
        parent_run_id=sweep.parent_run_id,
        trial_id=context.get_trial_id(),
        run_name=trial_label(axes, index),
        tags={**axis_tags(cfg, axes), "git_commit": sweep.git_commit, "trial_name": context.get_trial_name()},
        params=flatten(cfg.model_dump()),
    )
    if run.status == "FINISHED":
        # An earlier attempt completed the trial, but the driver was killed before Tune's
        # experiment state recorded it: report its result again instead of re-training.
        report_finished(run, cfg.steps)
        return
    reason = run.failure_reason()
    if reason and reason.startswith(DIVERGED_PREFIX):
        # Retrying from the last checkpoint would hit the same non-finite loss.
        raise TrialDivergedError(reason)
    if run.reattached:
        run.resume()

    run.set_tags({WORKER_PID_TAG: str(os.getpid()), WORKER_HOST_TAG: socket.gethostname()})

    trainer = Trainer(cfg, trial_device())
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
        run.set_tags({RESTORED_TAG: str(trainer.step)})

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        # Flush before the checkpoint is persisted: a crash in between makes the retry
        # measure those steps again (TrialRun drops the ones already stored) rather
        # than lose them.
        run.flush()
        with tempfile.TemporaryDirectory() as directory:
            trainer.save(directory)
            tune.report({**metrics, "step": step}, checkpoint=tune.Checkpoint.from_directory(directory))

    try:
        trainer.fit(run, on_checkpoint)
    except NonFiniteLossError as error:
        run.set_tags({FAILURE_TAG: f"{DIVERGED_PREFIX}: {error}"})
        run.finish("FAILED")
        raise
    except BaseException:
        run.discard()  # the retry measures these steps again from the last checkpoint
        raise
    run.finish("FINISHED")
