"""The Tune side of a launch: the Tuner built from a spec (or restored), run to the end.

Trials run `orchestrator.trials.trainable.run_trial`; MlflowTrialLogger writes each trial's MLflow
run from the driver (what the trials report, retries, final errors), CheckpointPruner
deletes superseded checkpoints, AutoscalerRequest asks an autoscaling cluster for the trials'
resources; ClusterConcurrencyLimiter decides how many trials run at once as the cluster grows.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from orchestrator.launch.autoscaler_request import AutoscalerRequest, cancel_request, requester_id
from orchestrator.launch.concurrency import ClusterConcurrencyLimiter, PlanSearcher
from orchestrator.launch.console import SweepConsole
from orchestrator.launch.parent_run import abandon_launch, fail_launch, finish_launch
from orchestrator.launch.record import Launch, LaunchRecord, storage_uri
from orchestrator.spec.cluster import worker_bundle
from orchestrator.spec.plan import SweepPlan
from orchestrator.spec.schema import SweepSpec
from orchestrator.trials.checkpoint_pruner import CheckpointPruner
from orchestrator.trials.distributed import run_distributed_trial, scaling
from orchestrator.trials.grid_search import GridCellSearcher
from orchestrator.trials.mlflow_logger import MlflowTrialLogger, SweepContext
from orchestrator.trials.trainable import run_trial, trial_label


DRIVER_MEMORY = 2**20  # bytes, Ray's memory resource
# Ray's own resource of the head node. A multi-worker trial's driver asks for a sliver of it, so
# it runs on the head (as the sweep's driver does): its Ray Train controller is pinned to the
# driver's node, and a controller that creates Ray's detached AutoscalingCoordinator leaves it
# there; on a GPU node that actor would keep the node from ever going idle. A spot reclaim of
# a GPU node then takes only workers, never a trial's driver.
HEAD_NODE_RESOURCE = "node:__internal_head__"
HEAD_SLIVER = 0.001
STATE_SYNC_S = 10  # seconds between uploads of Tune's experiment state to storage (see run_config)


def resourced_trainable(spec: SweepSpec) -> Any:
    """run_trial with the spec's per-trial resources: the same for a fresh and a restored Tuner.
    With workers > 1 the trial is run_distributed_trial, a driver that holds no CPU or GPU of
    its own: its TorchTrainer's workers ask for theirs (orchestrator/trials/distributed.py)."""
    r = spec.resources
    # Every report carries what the search and the scheduler read (orchestrator/trials/reporting.py).
    if not r.distributed:
        return tune.with_resources(
            tune.with_parameters(run_trial, report_metrics=spec.tune_metrics), {"cpu": r.cpu, "gpu": r.gpu}
        )
    driver = tune.with_parameters(
        run_distributed_trial,
        scaling_config=scaling(r.workers, r.cpu_per_worker, r.gpu_per_worker),
        report_metrics=spec.tune_metrics,
    )
    # Tune refuses a trial without any resource: the driver asks for a token of memory, no CPU,
    # so that a trial's workers fit where their CPUs alone fit; and a sliver of the head.
    return tune.with_resources(driver, {"cpu": 0, "memory": DRIVER_MEMORY, HEAD_NODE_RESOURCE: HEAD_SLIVER})


def build_tuner(
    spec: SweepSpec,
    plan: SweepPlan,
    context: SweepContext,
    name: str,
    verbose: bool = False,
    ask_autoscaler: bool = False,
) -> tune.Tuner:
    """The Tuner of a new launch. Trials come from a Searcher (the plan's grid in order, or an
    Optuna search per grid cell) behind a limiter that re-reads the cluster while the sweep
    runs (orchestrator/launch/concurrency.py); with `ask_autoscaler`, a callback asks the
    autoscaler for the trials' resources (orchestrator/launch/autoscaling.py)."""
    trainable = resourced_trainable(spec)
    param_space: dict[str, Any] = {"train": spec.train.model_dump(mode="json")}
    searcher: Any
    if spec.search is None:
        searcher = PlanSearcher([{"index": t.index, "axes": t.axes} for t in plan.trials])
        num_samples = len(plan.trials)
    else:
        space = {key: entry.model_dump() for key, entry in spec.search.space.items()}
        cells = grid_cells(plan.trials, space)
        searcher = GridCellSearcher(
            cells, space, spec.search.num_samples, spec.search.metric, spec.search.mode, seed=spec.train.seed
        )
        num_samples = len(cells) * spec.search.num_samples
    search_alg = ClusterConcurrencyLimiter(searcher, spec.resources, spec.max_concurrent or num_samples)
    scheduler = None
    if spec.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
            max_t=max(t.config.steps for t in plan.trials),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
        # No max_concurrent_trials: the limiter above is the cap (Tune would wrap it in a second one).
        trial_name_creator=lambda trial: trial_label(trial.config["trial"]["axes"], trial.config["trial"]["index"]),
        trial_dirname_creator=lambda trial: f"trial_{trial.config['trial']['index']:04d}_{trial.trial_id}",
        # A finished trial's worker runs the next trial (function trainables restart their
        # training thread with the new config): torch and timm are imported once per
        # slot instead of once per trial. Every trial asks for the same resources, as reuse needs.
        reuse_actors=True,
    )
    # The console reads each report's train loss before the MLflow logger takes the records
    # out of the result, and the logger does that before the CSV and JSON loggers see it.
    axis_paths = list(plan.trials[0].axes) if plan.trials else []
    if spec.search is not None:
        axis_paths += [key for key in spec.search.space if key not in axis_paths]
    console = SweepConsole(axis_paths, num_samples)
    mlflow_logger = MlflowTrialLogger(context)
    # The pruner tags each checkpoint it keeps for good (milestones, around emergence) on the trial's run.
    pruner = CheckpointPruner(keep=2, on_tags=mlflow_logger.tag_trial)
    callbacks: list[tune.Callback] = [console, mlflow_logger, pruner, CSVLoggerCallback(), JsonLoggerCallback()]
    if ask_autoscaler:
        r = spec.resources
        callbacks.append(AutoscalerRequest(requester_id(name), worker_bundle(r), r.workers, num_samples, spec.max_concurrent))
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_uri(spec.storage),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune keeps every checkpoint; CheckpointPruner deletes superseded ones once no saved
        # experiment state can point at them (Tune's own num_to_keep deletes too early for a resume).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        # Tune's experiment state (each trial's newest checkpoint) reaches storage at most every
        # sync_period seconds, 300 by default: a driver lost with the head would resume its trials
        # from checkpoints up to 5 minutes old, and the pruner (grace 120 s) could have deleted
        # them. The state is small; uploaded every STATE_SYNC_S it stays well inside the grace.
        sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
        # Tune's result.json and progress.csv per trial, but not its TensorBoard logger
        # (see fit_launch); MLflow holds the metrics.
        callbacks=callbacks,
        # Tune's own console output (a configuration box per trial) only with --verbose.
        verbose=1 if verbose else 0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def scheduler_summary(spec: SweepSpec) -> tuple[str, str]:
    """How a stopped trial's run names the scheduler that stopped it, and the metric it read."""
    s = spec.scheduler
    if s is None:
        return "", ""
    return (
        f"ASHA on {s.metric} ({s.mode}; grace period {s.grace_period} steps, reduction factor {s.reduction_factor:g})",
        s.metric,
    )


def grid_cells(trials: Sequence[Any], space: dict[str, Any]) -> list[dict[str, Any]]:
    """Distinct grid assignments (searched keys removed), in plan order."""
    cells: list[dict[str, Any]] = []
    for trial in trials:
        cell = {k: v for k, v in trial.axes.items() if k not in space}
        if cell not in cells:
            cells.append(cell)
    return cells


def fit_launch(
    launch: Launch, client: MlflowClient, record: LaunchRecord, ask_autoscaler: bool = False
) -> tune.ResultGrid:
    """Run (or restore and finish) the Tuner, then close the MLflow parent run. With
    `ask_autoscaler` the request for the trials' resources is cleared however fit ends, so
    the nodes scale down (a restored Tuner brings its request callback back from its state)."""
    if launch.resumed:
        tuner = tune.Tuner.restore(
            launch.path,
            trainable=resourced_trainable(launch.spec),
            # Errored trials already used up their max_failures retries (or diverged):
            # their FAILED runs are results, like finished trials, and are not re-run.
            resume_unfinished=True,
            resume_errored=False,
        )
    else:
        context = SweepContext(
            launch.tracking_uri, record.experiment_id, record.parent_run_id, launch.commit,
            *scheduler_summary(launch.spec),
        )
        tuner = build_tuner(launch.spec, launch.plan, context, launch.name, launch.verbose, ask_autoscaler)
    # Tune adds its TensorBoardX logger unless told not to; importing it pulls torch and boto3
    # into the driver (2-3 s of CPU while the first trials start) for event files nobody reads.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not launch.verbose:
        # Tune's new output engine prints an experiment box and a results path even at
        # verbose=0; its legacy engine is silent there. SweepConsole does the talking.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        abandon_launch(client, record)
        raise
    except Exception as error:
        fail_launch(client, record, error)
        raise
    finally:
        if ask_autoscaler:
            cancel_request(requester_id(launch.name))
    if results.num_terminated + results.num_errors < len(results):
        # Tune turns the first Ctrl+C into a normal return with unfinished trials.
        abandon_launch(client, record)
        print(
            f"\nSweep interrupted; run the same command again to resume launch {launch.name!r} from {launch.path}",
            file=sys.stderr,
        )
        raise SystemExit(130)
    finish_launch(client, record, launch.path, len(results), results.num_errors)
    return results
