"""Token norms per block (paper Fig. 3 and 4): statistics, fixed-bin histograms, outliers.

Everything is computed on the device in a few vectorised ops over all blocks at once and
copied to the host once, so the probe stays cheap for deep models.

Each block counts the tokens that exist there: with late registers (`model.register_depth` k)
the blocks before k hold [CLS] and the patches only, and register statistics start at block k.
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
    per_block = [t.norm(dim=-1) for t in cap.block_tokens]  # [B, N_i]: fewer tokens before late registers enter
    depth, batch = len(per_block), per_block[0].shape[0]
    regs = cap.num_registers
    bins = len(names.NORM_BIN_EDGES) - 1
    # Each block's patches after its own prefix: the same P tokens everywhere, whatever the prefix.
    patch = torch.stack([n[:, cap.prefix_at(i) :] for i, n in enumerate(per_block)]).reshape(depth, -1)
    cls = torch.stack([n[:, 0] for n in per_block]) if cap.has_cls else per_block[0].new_full((depth, batch), float("nan"))
    reg = _register_stats(per_block, cap)

    robust = [robust_outliers(patch[i]) for i in range(depth)]
    robust_mask = torch.stack([mask for mask, _ in robust]).reshape(depth, batch, -1)
    abs_mask = absolute_outliers(patch, cutoff).reshape(depth, batch, -1)

    arrays: dict[str, torch.Tensor | np.ndarray] = {
        "bin_edges": names.NORM_BIN_EDGES,
        "locations": np.array(location_names(depth)),
        "stat_names": np.array(STAT_NAMES),
        "hist_patch": histograms(patch, depth),
        "hist_cls": histograms(cls, depth) if cap.has_cls else torch.zeros(depth, bins, dtype=torch.long),
        **reg,
        "stats_patch": stats(patch),
        "stats_cls": stats(cls),
        "outlier_frac_robust": robust_mask.float().mean(dim=(1, 2)),
        "outlier_frac_abs": abs_mask.float().mean(dim=(1, 2)),
        "robust_threshold": torch.tensor([cut for _, cut in robust]),
        "outlier_map_robust": torch.stack([outlier_map(m, cap.grid) for m in robust_mask]),
        "outlier_map_abs": torch.stack([outlier_map(m, cap.grid) for m in abs_mask]),
        "token_norms_output": per_block[-1],
        "num_prefix_tokens": np.array(cap.num_prefix),
        "num_registers": np.array(regs),
        "registers_per_block": np.array([cap.registers_at(i) for i in range(depth)]),
    }
    host = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
    return NormSummary(
        arrays=host,
        scalars=_scalars(host, regs, cap.has_cls),
        output_norms=per_block[-1],
        output_outliers=robust_mask[-1],
    )


def _register_stats(per_block: list[torch.Tensor], cap: Capture) -> dict[str, torch.Tensor]:
    """hist_reg [L, R, bins], stats_reg [L, R, 5] and stats_reg_pooled [L, 5], registers in output order.

    A register counts from the block it enters: before `register_depth` late registers are not in
    the stream (NaN statistics, empty histograms). Those present sit after [CLS] and are the last
    ones of the output's order (late registers are inserted ahead of any test-time register)."""
    depth, batch = len(per_block), per_block[0].shape[0]
    regs, bins, start = cap.num_registers, len(names.NORM_BIN_EDGES) - 1, int(cap.has_cls)
    out = {
        "hist_reg": torch.zeros(depth, regs, bins, dtype=torch.long, device=per_block[0].device),
        "stats_reg": per_block[0].new_full((depth, regs, len(STAT_NAMES)), float("nan")),
        "stats_reg_pooled": per_block[0].new_full((depth, len(STAT_NAMES)), float("nan")),
    }
    by_count: dict[int, list[int]] = {}
    for i in range(depth):
        by_count.setdefault(cap.registers_at(i), []).append(i)
    for present, blocks in by_count.items():
        if not present:
            continue
        each = torch.stack([per_block[i][:, start : start + present].T for i in blocks])  # [G, present, B]
        index = torch.tensor(blocks, device=each.device)
        out["stats_reg"][index, regs - present :] = stats(each)
        out["stats_reg_pooled"][index] = stats(each.reshape(len(blocks), -1))
        counts = histograms(each.reshape(-1, batch), len(blocks) * present).reshape(len(blocks), present, bins)
        out["hist_reg"][index, regs - present :] = counts
    return out


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
        if a["registers_per_block"][i]:  # register statistics start where the registers enter
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
