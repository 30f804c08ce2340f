"""The two numbers the emergence monitor reads, from a full probe report or from a cheap pass.

A regular probe (trainers/probes/report.py) measures everything; an adaptive probe only needs
the output patch-token norms, so it runs one forward pass that keeps the last block's raw
output and nothing else (no per-block capture, attention, linear probes or files). Both
compute the same two numbers the same way, on the same fixed probe batch:
tests/test_emergence_measure.py checks that they agree.
"""

from __future__ import annotations

import torch

from trainers.emergence.monitor import Observation
from trainers.probes import names
from trainers.probes.capture import unwrap
from trainers.probes.norms import STAT_NAMES, stats
from trainers.probes.outliers import robust_outliers

OUTLIER_FRAC_KEY = names.outlier_frac(names.OUTPUT)
MAX_OVER_MEDIAN_KEY = names.norm_stat("max_over_median", "patch", names.OUTPUT)


def from_probe_scalars(scalars: dict[str, float], step: int) -> Observation:
    """The monitor's view of a regular probe's scalars."""
    return Observation(step, float(scalars[OUTLIER_FRAC_KEY]), float(scalars[MAX_OVER_MEDIAN_KEY]), regular=True)


@torch.no_grad()
def output_artifacts(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(outlier fraction, max/median norm) of the output patch tokens of `model` on `images`:
    fp32, eval mode (restored after), autocast off, as run_probes measures them."""
    vit = unwrap(model)
    was_training = vit.training
    vit.eval()
    device = next(vit.parameters()).device
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            # The raw residual stream after the last block (no final norm), prefix tokens split off.
            (patches,) = vit.forward_intermediates(
                images.to(device).float(), indices=1, norm=False, output_fmt="NLC", intermediates_only=True
            )
    finally:
        vit.train(was_training)
    norms = patches.float().norm(dim=-1).reshape(-1)
    mask, _ = robust_outliers(norms)
    ratio = stats(norms)[STAT_NAMES.index("max_over_median")]
    return float(mask.float().mean()), float(ratio)
