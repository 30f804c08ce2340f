"""python -m orchestrator.inspect MODEL [MODEL ...]: the artifact probes on pretrained ViTs, side by side.

Every MODEL becomes one MLflow run in the inspection experiment (--experiment, default
`inspect`) with the same probe metrics and files as a sweep trial; --test-time-registers adds
one run per model with a test-time register. The side-by-side report goes to --out and into
an `inspection-report` run. Exit status 2 with one line on stderr for bad input (unknown
model, missing file, no network for a hub name, weights that do not load, unreadable data or
store): then nothing is written, neither to MLflow nor to --out. Every model is loaded and
probed before the store is opened (what a probe measures is a few scalars and figures, held
until then), so that a file that fails to load, even the last one, leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = "Probe pretrained ViTs for high-norm artifact tokens and compare them side by side (docs/probes.md)."
EPILOG = """MODEL: a timm name with a pretrained tag (vit_small_patch14_dinov2.lvd142m), the same with a local
weights file (vit_small_patch14_dinov2.lvd142m=/path/model.safetensors), run:RUN_ID for the final
checkpoint of a sweep trial, or run:RUN_ID@STEP for one it kept at that step. DATA: an image folder, an ImageFolder root, a .tar shard, s3://bucket/prefix,
or 'shapes' (generated; the default for timm models; a trial uses its own data by default)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.inspect", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--data", default=None, help="images to probe on (see below)")
    parser.add_argument("--images", type=int, default=None, help="probe batch size (default 32; a trial: its own)")
    parser.add_argument("--search-images", type=int, default=64, help="images for the register-neuron search")
    parser.add_argument("--img-size", type=int, default=None, help="input size for timm models (default: the model's)")
    parser.add_argument("--outlier-cutoff", type=float, default=None, help="absolute norm cutoff (default: the paper's per family, else 150)")
    parser.add_argument("--test-time-registers", action="store_true", help="also measure each model with a test-time register")
    parser.add_argument("--ttr-layer", type=int, default=None, help="block whose output marks outliers (-1 last, -2 second-to-last)")
    parser.add_argument("--ttr-threshold", type=float, default=None, help="outlier norm threshold of the search (default: per family, else scale-free)")
    parser.add_argument("--ttr-top-k", type=int, default=None, help="number of register neurons")
    parser.add_argument("--ttr-max-layer", type=int, default=None, help="highest block a register neuron may sit in")
    parser.add_argument("--experiment", default="inspect", help="MLflow experiment (default: inspect)")
    parser.add_argument("--out", type=Path, default=Path("inspect_out"), help="folder for report.md, tables and figures")
    parser.add_argument("--tracking-uri", default=None, help="overrides MLFLOW_TRACKING_URI")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    for name in ("images", "search_images", "img_size", "ttr_top_k"):
        value = getattr(args, name)
        if value is not None and value < (4 if name == "images" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {4 if name == 'images' else 1}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing, so that --help and usage errors are instant.
    import torch

    from orchestrator.inspect.probe import InspectOptions, inspect_model
    from orchestrator.inspect.sources import InspectError, parse_model, resolve_all
    from orchestrator.inspect.store import InspectionStore, tracking_uri
    from trainers.data.images import SHAPES, check_source
    from trainers.data.layout import DatasetNotFoundError
    from trainers.pretrained import WeightsError

    uri = tracking_uri(args.tracking_uri)
    opts = InspectOptions(
        data=args.data, probe_images=args.images, search_images=args.search_images, img_size=args.img_size,
        outlier_cutoff=args.outlier_cutoff, test_time_registers=args.test_time_registers,
        ttr_overrides={"detect_layer": args.ttr_layer, "threshold": args.ttr_threshold, "top_k": args.ttr_top_k, "max_layer": args.ttr_max_layer},
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    with tempfile.TemporaryDirectory(prefix="inspect-") as cache:
        # Phase 1: every model as a local file and the data checked, before anything is written.
        try:
            if args.data not in (None, SHAPES):
                check_source(args.data)
            resolved = resolve_all([parse_model(m) for m in args.models], uri, Path(cache))
        except (InspectError, DatasetNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # Phase 2: load and probe one model at a time (big models are not all held in memory);
        # a file that does not load is bad input, so nothing is written until every model probed.
        probed = []
        for item in resolved:
            start = time.perf_counter()
            try:
                found = inspect_model(item, opts)
            except (WeightsError, DatasetNotFoundError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if found and found[0].weights_note:
                print(f"{item.label}: {found[0].weights_note}")
            for inspection in found:
                print(f"{inspection.column}: {_headline(inspection)}")
            print(f"  {time.perf_counter() - start:.1f} s")
            probed.append((item, found))
        # Phase 3: the MLflow runs and the report.
        from orchestrator.inspect.report import write_report
        from orchestrator.inspect.runs import log_inspection
        from orchestrator.stores.mlflow_store import StoreError

        try:
            store = InspectionStore(uri, args.experiment)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        inspections, cutoffs = [], []
        for item, found in probed:
            for inspection in found:
                inspection.run_id = log_inspection(store, item, inspection, opts)
                inspections.append(inspection)
                cutoffs.append(inspection.cutoff)
                print(f"{inspection.column}: run {inspection.run_id}")
        report = write_report(inspections, args.out, experiment=args.experiment, tracking_uri=uri, cutoffs=cutoffs)
        report_run = store.log_report(args.out, {"inspect.models": json.dumps([i.label for i in resolved])[:5000]})
    print(f"report: {report}")
    print(f"experiment: {args.experiment} at {uri} (report run {report_run})")
    return 0


def _headline(inspection) -> str:
    from trainers.probes import names

    frac = inspection.scalars.get(names.outlier_frac(names.OUTPUT), float("nan"))
    text = f"{100 * frac:.2f}% outlier patches at the output"
    return text + (f"; {inspection.note}" if inspection.note else "")


if __name__ == "__main__":
    sys.exit(main())
