"""Probe one resolved model, as it is and (optionally) with a test-time register.

Image size and patch grid follow the model: a timm model is fed at its pretrained input size
(or --img-size), normalised with its pretrained config's mean and std; a trial's model gets
its own data (its probe batch, validation split and training images) unless --data is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from orchestrator.inspect.sources import TRIAL, ResolvedModel
from trainers.config import ProbeConfig
from trainers.data.images import load_images
from trainers.data.real import IMAGENET_STATS
from trainers.model import register_depth
from trainers.pretrained import load_timm, load_trial_checkpoint
from trainers.test_time import TestTimeRegisterConfig, default_config
from trainers.test_time.compare import Comparison, compare, compare_on_trial

DEFAULT_PROBE_IMAGES = 32
AS_TRAINED = "as trained"
TEST_TIME = "test-time register"


@dataclass
class InspectOptions:
    data: str | None = None  # None: 'shapes' for timm models, the trial's own data for trials
    probe_images: int | None = None  # None: 32, or the trial's own probe batch size
    search_images: int = 64
    img_size: int | None = None
    outlier_cutoff: float | None = None  # None: the paper's cutoff for the family (30 OpenCLIP-B, 150 DINOv2), else 150
    test_time_registers: bool = False
    ttr_overrides: dict[str, object] = field(default_factory=dict)  # detect_layer, threshold, top_k, max_layer
    device: str = "cpu"


@dataclass
class Inspection:
    """One model variant: becomes one MLflow run and one column of the report."""

    label: str
    kind: str  # hub, file, trial
    model_name: str  # timm name, or the trial's model label
    variant: str  # AS_TRAINED or TEST_TIME
    num_registers: int  # registers the model was trained with
    depth: int
    patch_size: int
    img_size: int
    data: str
    cutoff: float  # the absolute outlier cutoff of the probe
    scalars: dict[str, float]
    files: dict[str, bytes]
    search: dict[str, object] | None = None  # NeuronSearch.summary() (test-time variant, and the note on the other)
    note: str = ""
    weights_note: str = ""  # how the weights file was adapted to load (trainers.pretrained.PretrainedModel.note)
    seconds: float = 0.0
    run_id: str | None = None
    register_depth: int = 0  # the block the trained registers enter before (0: the input)

    @property
    def column(self) -> str:
        return self.label if self.variant == AS_TRAINED else f"{self.label} + test-time register"


def ttr_config(arch: str | None, overrides: dict[str, object], images: int) -> TestTimeRegisterConfig:
    cfg = default_config(arch)
    return cfg.model_copy(update={**{k: v for k, v in overrides.items() if v is not None}, "images": images})


def inspect_model(item: ResolvedModel, opts: InspectOptions) -> list[Inspection]:
    start = time.perf_counter()
    device = torch.device(opts.device)
    if item.kind == TRIAL:
        trial = load_trial_checkpoint(item.weights, device)
        model, cfg = trial.model, trial.config
        model_name, img_size = f"{cfg.model.label}, {trial.step} steps", cfg.model.img_size
        ttr = ttr_config(None, opts.ttr_overrides, opts.search_images) if opts.test_time_registers else None
        probe_cfg = cfg.probe.model_copy(update={
            "outlier_cutoff": opts.outlier_cutoff or cfg.probe.outlier_cutoff,
            "batch_size": opts.probe_images or cfg.probe.batch_size,
        })
        if opts.data is None:
            result = compare_on_trial(model, cfg.model_copy(update={"probe": probe_cfg}), ttr, device=device, figures=True)
            data = (
                f"the trial's own data ({cfg.data.name}): its probe batch of {probe_cfg.batch_size}, top-1 on its "
                f"validation split, the search on its first training batch"
            )
            return _inspections(item, result, opts, model, model_name, img_size, data, probe_cfg.outlier_cutoff, start)
        mean, std, crop = IMAGENET_STATS[0], IMAGENET_STATS[1], 1.0  # explicit data: ImageNet normalisation
        weights_note = ""
    else:
        loaded = load_timm(item.spec.name, item.weights, img_size=opts.img_size, device=device)
        model, arch, img_size = loaded.model, item.spec.name.split(".")[0], loaded.img_size
        model_name, weights_note = item.spec.name, loaded.note
        mean, std, crop = loaded.mean, loaded.std, float(model.pretrained_cfg.get("crop_pct") or 1.0)
        ttr = ttr_config(arch, opts.ttr_overrides, opts.search_images) if opts.test_time_registers else None
        cutoff = opts.outlier_cutoff or default_config(arch).threshold or ProbeConfig().outlier_cutoff
        probe_cfg = ProbeConfig(batch_size=opts.probe_images or DEFAULT_PROBE_IMAGES, outlier_cutoff=cutoff)
    images = load_images(
        opts.data or "shapes", img_size=img_size, mean=mean, std=std, crop_pct=crop,
        probe_size=probe_cfg.batch_size, search_size=opts.search_images,
    )
    result = compare(
        model, images.probe.to(device), images.search.to(device) if ttr else None, probe_cfg, ttr, figures=True
    )
    found = _inspections(item, result, opts, model, model_name, img_size, images.description, probe_cfg.outlier_cutoff, start)
    for inspection in found:
        inspection.weights_note = weights_note
    return found


def _inspections(
    item, result: Comparison, opts, model, model_name: str, img_size: int, data: str, cutoff: float, start: float
) -> list[Inspection]:
    common = {
        "label": item.label, "kind": item.kind, "model_name": model_name, "num_registers": int(model.num_reg_tokens),
        "depth": len(model.blocks), "register_depth": register_depth(model), "patch_size": int(model.patch_embed.patch_size[0]), "img_size": img_size,
        "data": data, "cutoff": cutoff,
    }
    search = result.search.summary() if result.search is not None else None
    base = Inspection(variant=AS_TRAINED, scalars=result.baseline.scalars, files=result.baseline.files, search=search, **common)
    found = []
    if opts.test_time_registers and result.test_time is None:
        base.note = "test-time register: no outlier patches at the detection layer, so no register neurons to move"
    if result.test_time is not None:
        found.append(Inspection(variant=TEST_TIME, scalars=result.test_time.scalars, files=result.test_time.files, search=search, **common))
    elapsed = time.perf_counter() - start
    for inspection in [base, *found]:
        inspection.seconds = elapsed
    return [base, *found]
