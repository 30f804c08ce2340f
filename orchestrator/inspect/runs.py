"""What one inspected model variant writes to MLflow: its tags, params, probe metrics and files."""

from __future__ import annotations

import json

from orchestrator.inspect.probe import TEST_TIME, Inspection, InspectOptions
from orchestrator.inspect.sources import TRIAL, ResolvedModel
from orchestrator.inspect.store import InspectionStore

NEURONS_FILE = "register_neurons.json"


def run_tags(item: ResolvedModel, inspection: Inspection) -> dict[str, str]:
    tags = {
        "inspect.source": item.kind,
        "inspect.model": item.spec.name if item.kind != TRIAL else inspection.model_name,
        "inspect.weights": str(item.weights),
        "inspect.variant": inspection.variant,
        "num_registers": str(inspection.num_registers),  # registers the model was trained with
        "inspect.test_time_register": "1" if inspection.variant == TEST_TIME else "0",
    }
    if item.kind == TRIAL:
        tags["inspect.trial_run"] = item.spec.name
        if item.spec.step is not None:
            tags["inspect.trial_step"] = str(item.spec.step)  # run:RUN_ID@STEP: a kept checkpoint, not the final one
    if inspection.weights_note:
        tags["inspect.weights_note"] = inspection.weights_note[:5000]
    return tags


def run_params(inspection: Inspection, opts: InspectOptions) -> dict[str, object]:
    params: dict[str, object] = {
        "img_size": inspection.img_size,
        "patch_size": inspection.patch_size,
        "depth": inspection.depth,
        "register_depth": inspection.register_depth,
        "data": inspection.data,
        "outlier_cutoff": inspection.cutoff,
        "device": opts.device,
    }
    if inspection.search is not None:
        for key in ("detect_layer", "max_layer", "threshold", "detector", "images"):
            params[f"ttr.{key}"] = inspection.search[key]
        params["ttr.top_k"] = len(inspection.search["neurons"])  # type: ignore[arg-type]
    return params


def log_inspection(store: InspectionStore, item: ResolvedModel, inspection: Inspection, opts: InspectOptions) -> str:
    extra = {NEURONS_FILE: json.dumps(inspection.search, indent=2).encode()} if inspection.search is not None else None
    return store.log_model_run(
        inspection.column[:250], run_tags(item, inspection), run_params(inspection, opts),
        inspection.scalars, inspection.files, extra,
    )
