"""run_probes: every artifact probe on one fixed batch, as scalars and files.

Pure: no Ray, no MLflow, no global state. The caller logs `scalars` against the step and
writes `files` under names.artifact_dir(step).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from trainers.config import ProbeConfig
from trainers.data.base import Batch
from trainers.probes import names
from trainers.probes.attention import summarise_attention
from trainers.probes.capture import capture, unwrap
from trainers.probes.dense import corloc, patch_labels, patch_pixels, segmentation_miou
from trainers.probes.linear import MIN_IMAGES, class_probes, token_probes
from trainers.probes.norms import summarise_norms
from trainers.probes.outliers import neighbour_cosine

SEED = 0  # subsampling inside the linear probes is reproducible across steps and trials


@dataclass
class ProbeReport:
    scalars: dict[str, float]  # metric name (names.py) -> value, logged against the step
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> content, under names.artifact_dir(step)
    seconds: float = 0.0  # wall time of the probe


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def run_probes(
    model: torch.nn.Module, batch: Batch, cfg: ProbeConfig, *, figures: bool | None = None
) -> ProbeReport:
    """Measure artifact tokens, registers and attention of `model` on `batch` (fp32, eval mode).

    figures: draw PNGs; None draws them unless cfg.figures is "off" (the trainer, which
    knows which probe is the last, decides "end"). The model's train/eval mode is restored.
    """
    start = time.perf_counter()
    vit: VisionTransformer = unwrap(model)
    was_training = vit.training
    device = next(vit.parameters()).device
    vit.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            report = _measure(vit, batch.to(device), cfg, cfg.figures != "off" if figures is None else figures)
    finally:
        vit.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    report.scalars[names.PROBE_SECONDS] = report.seconds
    return report


def _measure(vit: VisionTransformer, batch: Batch, cfg: ProbeConfig, figures: bool) -> ProbeReport:
    images = batch.images.float()
    cap = capture(vit, images)
    norms = summarise_norms(cap, cfg.outlier_cutoff)
    outliers = norms.output_outliers  # [B, P] robust detector at the output
    attention = summarise_attention(
        vit.blocks[-1].attn, cap.qkv, cap.num_prefix, cap.has_cls, cap.grid, outliers, images
    )
    scalars = {**norms.scalars, **attention.scalars}

    # Where outliers sit (Fig. 5a): redundancy of their input patches.
    cosine = neighbour_cosine(cap.patch_embed, cap.grid)
    if outliers.any():
        scalars[names.NEIGHBOUR_COS_OUTLIER] = float(cosine[outliers].mean())
    if (~outliers).any():
        scalars[names.NEIGHBOUR_COS_NORMAL] = float(cosine[~outliers].mean())

    # What outliers hold (Table 1), from the normed output tokens a downstream head would see.
    generator = torch.Generator().manual_seed(SEED)
    patches = cap.features[:, cap.num_prefix :]
    scalars.update(token_probes(patches, outliers, patch_pixels(images, cap.grid), generator))
    # A pretrained head may have fewer classes than the probe data (or none): the probe needs every label.
    num_classes = max(vit.num_classes, int(batch.labels.max()) + 1)
    scalars.update(
        class_probes(
            cap.features, batch.labels, num_classes, cap.num_prefix, cap.has_cls, outliers,
            norms.output_norms[:, cap.num_prefix :], generator,
        )
    )

    # Dense payoff, only where the data has masks.
    if batch.masks is not None and len(batch) >= MIN_IMAGES:
        num_labels = int(batch.masks.max()) + 1
        if num_labels > 1:
            labels = patch_labels(batch.masks, cap.grid, num_labels)
            scalars[names.SEG_MIOU] = segmentation_miou(patches, labels, num_labels)
        found = corloc(attention.cls_maps, batch.masks) if attention.cls_maps is not None else float("nan")
        if math.isfinite(found):  # NaN when no probe image has an object: leave the metric out
            scalars[names.CORLOC] = found

    files = {names.NORMS_FILE: npz_bytes(norms.arrays), names.ATTENTION_FILE: npz_bytes(attention.arrays)}
    if figures:
        from trainers.probes import figures as draw

        files[names.NORM_HIST_FIGURE] = draw.norm_histograms(norms.arrays)
        files[names.ATTENTION_FIGURE] = draw.attention_grid(attention.arrays)
        files[names.OUTLIER_MAP_FIGURE] = draw.outlier_maps(norms.arrays)
    return ProbeReport(scalars=scalars, files=files)
