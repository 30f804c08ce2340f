"""Trials that span processes, GPUs and nodes: Ray Train inside Tune (resources.workers > 1).

The pattern of Ray's guide for the pinned Ray (2.60, Train V2, on by default): the Tune trial
is a small driver, `run_distributed_trial`, that builds a TorchTrainer with a ScalingConfig
and calls fit. TorchTrainer starts `workers` actors, sets up torch.distributed in them (NCCL
where every worker sees CUDA, else gloo: orchestrator/trials/process_group.py) and runs
`train_worker` in each. Ray's TuneReportCallback passes rank
0's reports on to the Tune trial, so the driver's MlflowTrialLogger sees them as it sees a
one-process trial's: the records ride with every report (orchestrator/trials/records.py) and
land in the trial's one MLflow run. Rank 0 writes the checkpoints; Ray Train keeps them under
the trial's directory in the sweep's storage, in a Train run named TRAIN_RUN_NAME, which keeps
the newest two; rank 0 copies those to keep for good (milestones, emergence's neighbours)
beside it (orchestrator/trials/kept_copies.py).

Failures: the Train run itself does not retry (max_failures 0). A killed worker fails the
TorchTrainer, so the Tune trial fails and Tune retries it as it retries any trial (the
spec's max_failures, the same MLflow run). The retry's TorchTrainer finds the Train run's
checkpoint list in the trial directory (Ray Train's restoration by run name and storage
path) and every rank restores the latest checkpoint: the same as a resumed sweep.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Sequence

from orchestrator.trials.records import RECORDS_KEY, RESTORED_TAG, WORKER_HOST_TAG, WORKER_PID_TAG, RecordBuffer
from orchestrator.trials.reporting import LatestMetrics, measure_missing

REPORT_METRICS_KEY = "report_metrics"  # in train_loop_config: what the search and scheduler read
KEPT_ROOT_KEY = "kept_checkpoints_root"  # in train_loop_config: where rank 0 keeps checkpoints past pruning

TRAIN_RUN_NAME = "train"  # the Ray Train run's directory inside the Tune trial's directory


def scaling(workers: int, cpu_per_worker: float, gpu_per_worker: float) -> dict[str, Any]:
    """The ScalingConfig's arguments, plain values (they travel through tune.with_parameters)."""
    resources = {"CPU": cpu_per_worker}
    if gpu_per_worker:
        resources["GPU"] = gpu_per_worker
    return {"num_workers": workers, "use_gpu": gpu_per_worker > 0, "resources_per_worker": resources}


def run_distributed_trial(
    config: dict[str, Any], scaling_config: dict[str, Any], report_metrics: Sequence[str] = ()
) -> None:
    """The Tune trial's driver: one TorchTrainer.fit per attempt."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train._internal.session import get_session
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.trials.kept_copies import KEPT_FOLDER
    from orchestrator.trials.process_group import DeviceTorchConfig
    from orchestrator.trials.trainable import DIVERGED_KEY

    diverged = config["trial"].get(DIVERGED_KEY)
    if diverged:
        from trainers.loop import NonFiniteLossError

        raise NonFiniteLossError(f"{diverged} (in an earlier attempt; not trained again)")
    storage = get_session().storage  # the Tune trial's directory, local or s3://
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            **config, REPORT_METRICS_KEY: list(report_metrics), KEPT_ROOT_KEY: f"{storage.trial_fs_path}/{KEPT_FOLDER}",
        },
        scaling_config=ScalingConfig(**scaling_config),
        torch_config=DeviceTorchConfig(),  # NCCL only where the workers see CUDA (process_group.py)
        run_config=RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """One data-parallel rank. torch.distributed is already set up by TorchTrainer."""
    import ray.train

    from orchestrator.trials.kept_checkpoints import watch_plan
    from orchestrator.trials.kept_copies import KeptCopies
    from orchestrator.trials.process_group import worker_device
    from orchestrator.trials.trainable import NUM_CLASSES_TAG, trial_config
    from trainers.loop import Trainer

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cfg = trial_config(config["train"], config["trial"]["axes"])
    records = RecordBuffer()
    if rank == 0:
        records.set_tags({WORKER_PID_TAG: str(os.getpid()), WORKER_HOST_TAG: socket.gethostname()})
    trainer = Trainer(cfg, worker_device(), rank=rank, world_size=world_size)
    if rank == 0:
        records.set_tags({NUM_CLASSES_TAG: str(trainer.data.num_classes)})
    tracker = LatestMetrics(records)  # rank 0's is the one reported (the loop measures on rank 0 only)
    kept = None
    if rank == 0:
        kept = KeptCopies(config[KEPT_ROOT_KEY], context.get_storage().storage_filesystem, *watch_plan(cfg))

    def report(step: int, directory: str | None) -> None:
        # Every rank reports (Ray Train waits for all); rank 0's report, with its checkpoint
        # and records, is the one TuneReportCallback passes to the Tune trial.
        if rank != 0:
            ray.train.report({"step": step})
            return
        # The emergence watch's numbers ride along for the driver's console and pruner (trainers/emergence/keys.py).
        report = {**tracker.latest, **trainer.watch.report_values(), "step": step, RECORDS_KEY: records.take()}
        checkpoint = None if directory is None else ray.train.Checkpoint.from_directory(directory)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:09d}")

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)  # every rank restores the same state
            tracker = LatestMetrics(records, LatestMetrics.saved(directory))
        if rank == 0:
            records.set_tags({RESTORED_TAG: str(trainer.step)})
        if trainer.step >= cfg.steps or trainer.watch.stopped:
            # Finished (or stopped on emergence) before the sweep's driver recorded it: report the result again.
            report(trainer.step, None)
            return

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        if rank != 0:
            report(step, None)
            return
        measure_missing(trainer, tracker, config.get(REPORT_METRICS_KEY, ()))
        with tempfile.TemporaryDirectory() as directory:
            trainer.save(directory)
            tracker.save(directory)
            assert kept is not None
            records.set_tags(kept.on_checkpoint(step, directory, trainer.watch.report_values()))
            report(step, directory)

    trainer.fit(tracker, on_checkpoint)
