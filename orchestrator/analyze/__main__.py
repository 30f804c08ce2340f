"""python -m orchestrator.analyze --experiment NAME --out DIR: analyse a sweep stored in MLflow.

Exit status 2 with one line on stderr for problems with the input (unknown experiment,
unreachable store, no finished trials, bad option).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.errors import AnalysisError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.analyze",
        description="When do artifact tokens emerge, and which register count is best? Reads a sweep from MLflow "
        "(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment = sweep name")
    parser.add_argument("--out", type=Path, default=Path("analysis_out"), help="folder for report.md, tables, figures")
    parser.add_argument("--parent-run", default=None, help="only the trials of this launch (parent run id)")
    parser.add_argument("--threshold", type=float, default=0.01, help="outlier fraction above which artifacts are present")
    parser.add_argument(
        "--metric-for-best",
        default="miou",
        choices=[m.short for m in cat.REGISTER_METRICS],
        help="dense score of the recommendation rule (default miou; falls back to top1 when missing)",
    )
    parser.add_argument("--tracking-uri", default=None, help="overrides MLFLOW_TRACKING_URI")
    parser.add_argument("--no-log", action="store_true", help="do not log an analysis run to MLflow")
    parser.add_argument(
        "--no-test-time-registers",
        action="store_true",
        help="skip loading the no-register trials' final checkpoints to measure them with a test-time register",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold must be a fraction in [0, 1), got {args.threshold}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # MLflow draws a progress bar for every artifact download (probe files, checkpoints): one
    # per trial would bury the summary below.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Imported in steps so that --help and input errors come before matplotlib and the figure code load.
    from orchestrator.analyze.load import load_sweep

    try:
        sweep = load_sweep(args.experiment, args.tracking_uri, args.parent_run)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from orchestrator.analyze.pipeline import analyse_sweep, skipped_summary

    result = analyse_sweep(
        sweep,
        args.out,
        parent_run=args.parent_run,
        threshold=args.threshold,
        metric_for_best=args.metric_for_best,
        log_to_mlflow=not args.no_log,
        test_time_registers=not args.no_test_time_registers,
    )
    rec = result.recommendation
    print(f"report: {result.report_path}")
    skipped = f", {skipped_summary(result.sweep)}" if result.sweep.skipped else ", 0 skipped"
    print(f"trials: {len(result.sweep.trials)} analysed{skipped}")
    print(f"artifacts in: {', '.join(result.sizes_with_artifacts) or 'no size'}")
    for check in result.learning:
        print(f"learned? {check.sentence()}")
    if rec.missing:
        print("recommended registers: none, the data cannot support one yet:")
        for reason in rec.missing:
            print(f"  - {reason}")
    else:
        print(f"recommended registers: {rec.label or 'none'}"  # '4', or '4@3' for 4 entering before block 3
              + ("" if rec.can_tell else " (the sweep cannot tell with confidence)"))
    if result.analysis_run_id:
        print(f"analysis run: {result.analysis_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
