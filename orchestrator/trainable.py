"""The Ray Tune trainable: a thin adapter between Tune's config dict and trainers/.

It builds the typed TrainConfig, reattaches to (or opens) the trial's one MLflow run,
restores the checkpoint Tune hands back after a failure, runs the loop, and reports
to Tune at every checkpoint point.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.tracking import DIVERGED_PREFIX, FAILURE_TAG, TrialRun, flatten
from trainers.config import TrainConfig
from trainers.loop import NonFiniteLossError, Trainer

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


class TrialDivergedError(RuntimeError):
    """A retry of a trial that already diverged: the loss will be non-finite again, so stop."""


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    node = tree
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


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


def run_trial(config: dict[str, Any]) -> None:
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
    reason = run.failure_reason()
    if reason and reason.startswith(DIVERGED_PREFIX):
        run.finish("FAILED")
        raise TrialDivergedError(reason)

    trainer = Trainer(cfg)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        # Flush before the checkpoint is persisted: a crash in between repeats a few
        # steps on retry rather than losing them.
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
