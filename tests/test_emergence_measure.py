"""An adaptive probe's cheap pass measures what a full probe measures, on the same batch."""

from __future__ import annotations

import pytest
import torch

from planted_neuron import plant_register_neuron
from trainers.config import ModelConfig, ProbeConfig
from trainers.data.base import Batch
from trainers.emergence.measure import MAX_OVER_MEDIAN_KEY, OUTLIER_FRAC_KEY, from_probe_scalars, output_artifacts
from trainers.model import build_model
from trainers.probes import run_probes


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("planted", [False, True])
def test_the_cheap_pass_agrees_with_the_full_probe(registers: int, planted: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="micro", img_size=32, patch_size=4, num_registers=registers), num_classes=4)
    if planted:
        plant_register_neuron(model, layer=1, unit=7, by="position", positions=list(range(0, 64, 8)))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()  # the cheap pass, like run_probes, measures in eval mode and restores the mode
    scalars = run_probes(model, Batch(images, torch.arange(8) % 4), ProbeConfig(), figures=False).scalars
    frac, ratio = output_artifacts(model, images)
    assert model.training
    assert frac == pytest.approx(scalars[OUTLIER_FRAC_KEY], abs=1e-7)
    assert ratio == pytest.approx(scalars[MAX_OVER_MEDIAN_KEY], rel=1e-5)
    assert (frac == pytest.approx(1 / 8)) if planted else frac == 0.0
    observation = from_probe_scalars(scalars, step=5)
    assert observation.step == 5 and observation.regular and observation.outlier_frac == scalars[OUTLIER_FRAC_KEY]
