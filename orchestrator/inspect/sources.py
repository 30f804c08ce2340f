"""What MODEL on the command line means, and turning each into a local file before anything is written.

    vit_small_patch14_dinov2.lvd142m         a timm name with a pretrained tag: the Hugging Face
                                             cache, else a download (fails fast with no network)
    vit_small_patch14_dinov2.lvd142m=PATH    the same architecture and config, weights from a local
                                             file (timm or original state dict, .safetensors/.pth/.bin/.npz)
    run:RUN_ID  (or a bare 32-hex run id)    the final checkpoint of one of our sweep's trials
    run:RUN_ID@STEP                          the checkpoint that trial kept at training step STEP
                                             (probe.keep_checkpoints_at, or either side of emergence)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.stores.trial_checkpoints import StoreError, trial_checkpoint
from trainers.pretrained import WeightsError, check_architecture, hub_weights

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
AT_STEP = re.compile(r"^(?P<run>[^@]+)@(?P<step>\d+)$")
HUB, FILE, TRIAL = "hub", "file", "trial"


class InspectError(RuntimeError):
    """Bad input: the message is one line, the command exits 2 and writes nothing."""


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as given
    kind: str  # HUB, FILE or TRIAL
    name: str  # timm name (HUB, FILE) or MLflow run id (TRIAL)
    path: Path | None = None  # FILE only
    step: int | None = None  # TRIAL only: a kept checkpoint's step; None = the final checkpoint


@dataclass
class ResolvedModel:
    spec: ModelSpec
    weights: Path  # local weights file, or the trial's trainer_state.pt
    label: str  # unique display name in the report and the run name
    trial_tags: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec.kind


def parse_model(text: str) -> ModelSpec:
    text = text.strip()
    if text.startswith("run:") or RUN_ID.match(text.partition("@")[0]):
        run_id, step = text.removeprefix("run:"), None
        if "@" in run_id:
            found = AT_STEP.match(run_id)
            if not found:
                raise InspectError(f"{text}: a trial's checkpoint at a step is run:RUN_ID@STEP, STEP a number of training steps")
            run_id, step = found.group("run"), int(found.group("step"))
        if not RUN_ID.match(run_id):
            raise InspectError(f"{text}: an MLflow run id is 32 hex digits")
        return ModelSpec(text, TRIAL, run_id, step=step)
    if "=" in text:
        name, _, path = text.partition("=")
        if not name or not path:
            raise InspectError(f"{text}: a local file is given as TIMM_NAME=PATH, e.g. vit_small_patch14_dinov2.lvd142m=/data/model.safetensors")
        return ModelSpec(text, FILE, name, Path(path).expanduser())
    return ModelSpec(text, HUB, text)


def resolve_all(specs: list[ModelSpec], tracking_uri: str, cache: Path) -> list[ResolvedModel]:
    """Every model as a local file; the first problem raises InspectError (before anything is written)."""
    resolved: list[ResolvedModel] = []
    seen: dict[str, int] = {}
    for spec in specs:
        try:
            item = _resolve(spec, tracking_uri, cache)
        except (WeightsError, StoreError) as exc:
            raise InspectError(str(exc)) from None
        seen[item.label] = seen.get(item.label, 0) + 1
        if seen[item.label] > 1:
            item.label = f"{item.label} #{seen[item.label]}"
        resolved.append(item)
    return resolved


def _resolve(spec: ModelSpec, tracking_uri: str, cache: Path) -> ResolvedModel:
    if spec.kind == HUB:
        return ResolvedModel(spec, hub_weights(spec.name), spec.name)
    if spec.kind == FILE:
        check_architecture(spec.name)
        assert spec.path is not None
        if not spec.path.is_file():
            raise WeightsError(f"{spec.text}: no file at {spec.path}")
        return ResolvedModel(spec, spec.path, f"{spec.name} ({spec.path.name})")
    path, tags = trial_checkpoint(tracking_uri, spec.name, cache, step=spec.step)
    name = tags.get("mlflow.runName") or spec.name[:8]
    return ResolvedModel(spec, path, f"trial {name}" + (f" @ step {spec.step}" if spec.step is not None else ""), tags)
