"""Names of everything the probes write: the contract between probes and analysis.

Probes log scalars under these names (against the training step) and write per-probe
files under `artifact_dir(step)`. The analysis reads the same names back, so both sides
import them from here instead of spelling strings twice.

Locations: `block_XX` is the raw residual stream after block XX (0-based, no final
norm), `output` is the last block's raw output (what the paper's Fig. 3 plots).
Detectors: `robust` is scale-free (works for any width), `abs` is the absolute cutoff
(ProbeConfig.outlier_cutoff; the paper uses 150 for DINOv2 ViT-g).
"""

from __future__ import annotations

import numpy as np

PREFIX = "probe"
OUTPUT = "output"
DETECTORS = ("robust", "abs")

# Fixed log-spaced histogram bins, identical for every step, trial and model width,
# so that histograms can be added and compared across a sweep.
NORM_BIN_EDGES: np.ndarray = np.logspace(-2, 4, 121)


def block(index: int) -> str:
    return f"block_{index:02d}"


def outlier_frac(location: str, detector: str = "robust") -> str:
    """Fraction of patch tokens flagged as high-norm outliers at a location."""
    suffix = "" if detector == "robust" else f"_{detector}"
    return f"{PREFIX}/outlier_frac{suffix}/{location}"


def norm_stat(stat: str, token: str, location: str) -> str:
    """Token-norm statistic. stat: mean|median|p99|max|max_over_median;
    token: patch|cls|reg (registers pooled)|reg_00, reg_01, ... (one register)."""
    return f"{PREFIX}/norm_{stat}/{token}/{location}"


def attn(stat: str, query: str) -> str:
    """Last-block attention statistic. stat: entropy|tv|outlier_mass; query: cls|reg_00|..."""
    return f"{PREFIX}/attn_{stat}/{query}"


# Where-outliers-sit and what-outliers-hold probes (paper Fig. 5a, Table 1).
NEIGHBOUR_COS_OUTLIER = f"{PREFIX}/neighbour_cos/outlier"
NEIGHBOUR_COS_NORMAL = f"{PREFIX}/neighbour_cos/normal"


def linear_probe(task: str, token: str) -> str:
    """Held-out score of a linear probe. task: position_acc|pixel_mse|class_acc;
    token: outlier|normal|cls|reg, or normal_matched (normal tokens drawn to the outliers' count)."""
    return f"{PREFIX}/linear/{task}/{token}"


# Dense payoff.
SEG_MIOU = f"{PREFIX}/seg_miou"
CORLOC = f"{PREFIX}/corloc"
PROBE_SECONDS = f"{PREFIX}/seconds"

# Training and validation metrics written by the trainer.
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
VAL_LOSS = "val/loss"
VAL_TOP1 = "val/top1"


def artifact_dir(step: int) -> str:
    """MLflow artifact folder of one probe evaluation."""
    return f"probes/step_{step:07d}"


# Files inside artifact_dir(step):
NORMS_FILE = "norms.npz"  # bin_edges [B+1]; hist_patch [L, B]; hist_cls [L, B]; hist_reg [L, R, B];
#                           stats_* arrays; outlier_frac_robust/abs [L]; L = depth, last row = output;
#                           registers_per_block [L] (0 before late registers enter: their rows are NaN / empty)
ATTENTION_FILE = "attention.npz"  # images uint8 [n,H,W,3]; cls_attn [n,h,w]; reg_attn [n,R,h,w];
#                                   outlier_mask bool [n,h,w]
NORM_HIST_FIGURE = "norm_hist.png"  # one panel per block: patch/cls/reg norm histograms (log-log)
ATTENTION_FIGURE = "attention.png"  # per probe image: image, [CLS] map, each register's map
OUTLIER_MAP_FIGURE = "outlier_map.png"  # output-layer outlier frequency per patch position
