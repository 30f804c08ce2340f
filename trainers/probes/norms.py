"""Token norms per block (paper Fig. 3 and 4): statistics, fixed-bin histograms, outliers.

Everything is computed on the device in a few vectorised ops over all blocks at once and
copied to the host once, so the probe stays cheap for deep models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainers.probes import names
from trainers.probes.capture import Capture
from trainers.probes.outliers import absolute_outliers, outlier_map, robust_outliers

STAT_NAMES = ("mean", "median", "p99", "max", "max_over_median")
COMPACT_PATCH_STATS = ("median", "max_over_median")  # per-block scalars; the rest lives in norms.npz


@dataclass
class NormSummary:
    arrays: dict[str, np.ndarray]  # contents of names.NORMS_FILE
    scalars: dict[str, float]
    output_norms: torch.Tensor  # [B, N] token norms at the output (prefix first)
    output_outliers: torch.Tensor  # [B, P] bool: robust detector at the output, used by the other probes


def location_names(depth: int) -> list[str]:
    return [names.block(i) for i in range(depth)]


def stats(values: torch.Tensor) -> torch.Tensor:
    """[..., M] samples -> [..., 5] in STAT_NAMES order (quantiles interpolate linearly)."""
    quantiles = torch.quantile(values, torch.tensor([0.5, 0.99], device=values.device), dim=-1)
    median, p99 = quantiles[0], quantiles[1]
    top = values.amax(dim=-1)
    return torch.stack([values.mean(dim=-1), median, p99, top, top / median.clamp_min(1e-12)], dim=-1)


def histograms(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Counts on names.NORM_BIN_EDGES: [G, M] -> [G, bins]. Values outside the edges go to the end bins."""
    edges = torch.as_tensor(names.NORM_BIN_EDGES, dtype=values.dtype, device=values.device)
    bins = len(edges) - 1
    index = (torch.bucketize(values.contiguous(), edges, right=True) - 1).clamp(0, bins - 1)
    offsets = torch.arange(groups, device=values.device).unsqueeze(1) * bins
    return torch.bincount((index + offsets).flatten(), minlength=groups * bins).reshape(groups, bins)


def summarise_norms(cap: Capture, cutoff: float) -> NormSummary:
    norms = torch.stack([t.norm(dim=-1) for t in cap.block_tokens])  # [L, B, N]
    depth, batch, _ = norms.shape
    regs = cap.num_registers
    bins = len(names.NORM_BIN_EDGES) - 1
    patch = norms[:, :, cap.num_prefix :].reshape(depth, -1)
    cls = norms[:, :, 0] if cap.has_cls else norms.new_full((depth, batch), float("nan"))
    reg_each = norms[:, :, cap.register_slice].permute(0, 2, 1)  # [L, R, B]

    robust = [robust_outliers(patch[i]) for i in range(depth)]
    robust_mask = torch.stack([mask for mask, _ in robust]).reshape(depth, batch, -1)
    abs_mask = absolute_outliers(patch, cutoff).reshape(depth, batch, -1)

    arrays: dict[str, torch.Tensor | np.ndarray] = {
        "bin_edges": names.NORM_BIN_EDGES,
        "locations": np.array(location_names(depth)),
        "stat_names": np.array(STAT_NAMES),
        "hist_patch": histograms(patch, depth),
        "hist_cls": histograms(cls, depth) if cap.has_cls else torch.zeros(depth, bins, dtype=torch.long),
        "hist_reg": histograms(reg_each.reshape(depth * regs, batch), depth * regs).reshape(depth, regs, bins)
        if regs
        else torch.zeros(depth, 0, bins, dtype=torch.long),
        "stats_patch": stats(patch),
        "stats_cls": stats(cls),
        "stats_reg": stats(reg_each) if regs else torch.zeros(depth, 0, len(STAT_NAMES)),
        "stats_reg_pooled": stats(reg_each.reshape(depth, -1)) if regs else torch.full((depth, 5), float("nan")),
        "outlier_frac_robust": robust_mask.float().mean(dim=(1, 2)),
        "outlier_frac_abs": abs_mask.float().mean(dim=(1, 2)),
        "robust_threshold": torch.tensor([cut for _, cut in robust]),
        "outlier_map_robust": torch.stack([outlier_map(m, cap.grid) for m in robust_mask]),
        "outlier_map_abs": torch.stack([outlier_map(m, cap.grid) for m in abs_mask]),
        "token_norms_output": norms[-1],
        "num_prefix_tokens": np.array(cap.num_prefix),
        "num_registers": np.array(regs),
    }
    host = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
    return NormSummary(
        arrays=host,
        scalars=_scalars(host, regs, cap.has_cls),
        output_norms=norms[-1],
        output_outliers=robust_mask[-1],
    )


def _scalars(a: dict[str, np.ndarray], regs: int, has_cls: bool) -> dict[str, float]:
    """Compact set per block; everything (each register included) at the output."""
    out: dict[str, float] = {}
    col = {s: i for i, s in enumerate(STAT_NAMES)}
    depth = len(a["locations"])
    for i, loc in enumerate(a["locations"]):
        for stat in COMPACT_PATCH_STATS:
            out[names.norm_stat(stat, "patch", loc)] = a["stats_patch"][i, col[stat]]
        for detector in names.DETECTORS:
            out[names.outlier_frac(loc, detector)] = a[f"outlier_frac_{detector}"][i]
        if has_cls:
            out[names.norm_stat("mean", "cls", loc)] = a["stats_cls"][i, col["mean"]]
        if regs:
            out[names.norm_stat("mean", "reg", loc)] = a["stats_reg_pooled"][i, col["mean"]]
    last = depth - 1
    for detector in names.DETECTORS:
        out[names.outlier_frac(names.OUTPUT, detector)] = a[f"outlier_frac_{detector}"][last]
    for stat, j in col.items():
        out[names.norm_stat(stat, "patch", names.OUTPUT)] = a["stats_patch"][last, j]
        if has_cls:
            out[names.norm_stat(stat, "cls", names.OUTPUT)] = a["stats_cls"][last, j]
        if regs:
            out[names.norm_stat(stat, "reg", names.OUTPUT)] = a["stats_reg_pooled"][last, j]
            for r in range(regs):
                out[names.norm_stat(stat, f"reg_{r:02d}", names.OUTPUT)] = a["stats_reg"][last, r, j]
    return {k: float(v) for k, v in out.items()}
