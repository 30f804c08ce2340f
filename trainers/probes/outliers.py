"""High-norm (artifact) patch tokens: two detectors, and where the flagged tokens sit.

Paper facts (Darcet et al. 2023, Sec. 2): artifact tokens have about 10x the norm of the
other patch tokens and the output norm distribution is bimodal. The paper's absolute
cutoff (150 for DINOv2 ViT-g) depends on the model, so beside it we run a scale-free
detector that flags a token only when it is far out on BOTH of two scales:

* robust z-score of its log-norm above ROBUST_Z, with median and MAD taken over all
  patch tokens of the batch at that location (the MAD is scaled to a normal sigma);
* norm at least MIN_RATIO times the median patch norm.

The z-score alone fires on the tail of a very narrow distribution (a random-init model's
norms vary by a few percent, so a 1.3x token has a huge z); the ratio alone fires on a
wide, unimodal, heavy-tailed distribution. Together they only fire on a separate high
mode, and on a healthy model or normal data they flag nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROBUST_Z = 6.0  # in units of MAD-sigma of log-norm: a normal sample flags ~1e-9 of tokens
MIN_RATIO = 4.0  # artifacts are ~10x the median (paper); 4x leaves room for weaker ones
MAD_TO_SIGMA = 1.4826


def robust_threshold(norms: torch.Tensor) -> float:
    """Norm above which the scale-free detector flags a token, from a pool of patch norms."""
    log_norms = norms.flatten().clamp_min(1e-12).log()
    median = log_norms.median()
    sigma = (log_norms - median).abs().median() * MAD_TO_SIGMA
    log_cut = median + max(ROBUST_Z * float(sigma), math.log(MIN_RATIO))
    return float(log_cut.exp())


def robust_outliers(norms: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Boolean mask of flagged tokens (same shape as `norms`) and the threshold used."""
    cut = robust_threshold(norms)
    return norms > cut, cut


def absolute_outliers(norms: torch.Tensor, cutoff: float) -> torch.Tensor:
    return norms > cutoff


def outlier_map(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Frequency of being flagged per patch position: [B, P] bool -> [h, w] in [0, 1]."""
    return mask.float().mean(dim=0).reshape(grid)


def neighbour_cosine(embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch to its 4 neighbours (fewer at borders).

    embeddings: [B, P, D] patch-embedding outputs -> [B, P]. Paper Fig. 5a: artifacts
    appear on redundant patches, whose input embeddings look like their neighbours'.
    """
    batch, _, dim = embeddings.shape
    h, w = grid
    unit = F.normalize(embeddings, dim=-1).reshape(batch, h, w, dim)
    total = torch.zeros(batch, h, w, device=embeddings.device)
    count = torch.zeros(1, h, w, device=embeddings.device)
    vertical = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # cos between (i, j) and (i+1, j)
    horizontal = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)
    total[:, 1:] += vertical
    total[:, :-1] += vertical
    total[:, :, 1:] += horizontal
    total[:, :, :-1] += horizontal
    count[:, 1:] += 1
    count[:, :-1] += 1
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return (total / count.clamp_min(1)).reshape(batch, h * w)
