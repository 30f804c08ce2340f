"""`python -m orchestrator.sweep SPEC [--dry-run] [--set key=value ...] [--launch NAME]`

Validates the spec, prints the plan, checks that data, MLflow and storage are reachable,
then runs the sweep through Ray Tune with every trial logged to MLflow. Exit codes:
0 done, 1 some trials failed, 2 bad spec, a trial no node of the cluster can hold, failed
preflight or an MLflow store that cannot be opened (no trial was started),
130 interrupted (Ctrl-C; run the same command again to resume).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shlex
import sys
from typing import TYPE_CHECKING, NoReturn, Sequence

from orchestrator.spec.cluster import check_cluster_holds, load_cluster_file
from orchestrator.spec.errors import SpecError
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import load_spec

if TYPE_CHECKING:
    from orchestrator.launch.run import SweepOutcome


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[1])
    parser.add_argument("spec", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without starting Ray")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec key (dotted path, YAML value), e.g. --set train.steps=50; repeatable",
    )
    parser.add_argument(
        "--launch", default=None, metavar="NAME",
        help="name of this launch's folder under storage (default: the sweep name); "
        "running again with the same name resumes an interrupted launch",
    )
    parser.add_argument(
        "--cluster", default=None, metavar="CONFIG",
        help="a Ray cluster launcher YAML or KubeRay RayCluster (e.g. infra/aws/cluster.yaml): the plan says how many "
        "trials run at once on it at full size and refuses trials none of its node types can hold",
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="Tune's and Ray's own console output (per-trial configuration boxes, worker logs) "
        "instead of the compact progress table",
    )
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        plan = make_plan(spec)
        cluster = load_cluster_file(args.cluster) if args.cluster else None
        if cluster is not None:
            check_cluster_holds(cluster, spec.resources)
    except SpecError as error:
        return fail(str(error))
    plan_text = format_plan(plan, cluster)
    print(plan_text)
    if args.dry_run:
        return 0

    # Heavy imports (Ray, MLflow, torch) only once the spec is known to be good.
    from orchestrator.launch.preflight import PreflightError, run_preflight
    from orchestrator.launch.run import LaunchFinishedError, run_sweep
    from orchestrator.launch.tune_state import TuneStateError
    from orchestrator.stores.mlflow_store import StoreError
    from orchestrator.stores.mlflow_uri import default_tracking_uri

    tracking_uri = default_tracking_uri()
    try:
        run_preflight([t.config for t in plan.trials], tracking_uri, spec.storage, spec.mlflow.artifact_location)
    except PreflightError as error:
        return fail(str(error))
    try:
        outcome = run_sweep(spec, plan, plan_text, args.overrides, args.launch, verbose=args.verbose, spec_file=args.spec)
    except (LaunchFinishedError, TuneStateError, StoreError) as error:
        return fail(str(error))
    except SpecError as error:  # a trial the running cluster can never hold (orchestrator/launch/autoscaling.py)
        return fail(str(error))

    print(
        f"\nSweep {outcome.experiment_name!r}: {outcome.trials} trials, {outcome.errored} failed."
        f"\n  MLflow experiment {outcome.experiment_id}, parent run {outcome.parent_run_id}"
        f"\n  Tune results and checkpoints: {outcome.launch_path}"
    )
    if outcome.results:
        print("\n" + "\n".join(outcome.results))
    print(f"\nAnalyse it:  {analysis_command(outcome)}")
    print(ui_hint(outcome.tracking_uri, runs_view_link(outcome, list(spec.axes))))
    return 1 if outcome.errored else 0


def runs_view_link(outcome: SweepOutcome, swept: list[str]) -> str | None:
    """The UI link that shows the runs with the axes and key metrics as columns (it saves a view
    on the experiment); None if that fails: a link is no reason to fail a finished sweep."""
    from orchestrator.stores.mlflow_ui import runs_view_url

    try:
        return runs_view_url(outcome.tracking_uri, outcome.experiment_id, swept)
    except Exception as error:  # the store went away, a server refused the tag, ...
        print(f"note: could not save the MLflow runs view ({error.__class__.__name__})", file=sys.stderr)
        return None


def analysis_command(outcome: SweepOutcome) -> str:
    """The analysis of this launch; it reads the same MLFLOW_TRACKING_URI (or ./mlflow.db)."""
    return (
        f"python -m orchestrator.analyze --experiment {shlex.quote(outcome.experiment_name)} "
        f"--parent-run {outcome.parent_run_id}"
    )


def ui_hint(tracking_uri: str, link: str | None = None) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"Open the runs in the MLflow UI: {link or tracking_uri}"
    return (
        f"Open the MLflow UI:  mlflow ui --backend-store-uri {tracking_uri}\n"
        f"  then browse {link or 'http://127.0.0.1:5000'}"
    )


def exit_without_teardown(code: int) -> NoReturn:
    """Run the exit hooks (Ray's shutdown, logging's flush), then leave at once. Python's own
    teardown would garbage-collect the object graphs of Ray, Tune, MLflow and pandas one last
    time: 1-2 s of every launch, for memory the OS takes back anyway."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
