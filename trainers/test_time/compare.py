"""A model measured as it is and again with a test-time register, on the same images.

What both the sweep analysis (orchestrator/analyze/test_time.py) and the inspect command run:
the probes on a fixed probe batch, optionally a top-1 pass, the register-neuron search on
separate images, and the same measurements with the test-time register in place.
`compare_on_trial` does it on a trial's own data: its fixed probe batch (so the numbers
compare with what the trial logged), its validation split for top-1, and its first training
batch for the search (never the probe images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainers.config import ProbeConfig, TrainConfig
from trainers.data.base import Batch
from trainers.probes import names
from trainers.probes.report import ProbeReport, run_probes
from trainers.test_time.intervention import test_time_register
from trainers.test_time.search import (
    NeuronSearch,
    TestTimeRegisterConfig,
    find_register_neurons,
)

Top1 = Callable[[torch.nn.Module], float]


@dataclass
class Comparison:
    baseline: ProbeReport  # the model as it is (scalars include val/top1 when a top-1 pass was given)
    test_time: ProbeReport | None  # with the test-time register; None when not asked or no neurons were found
    search: NeuronSearch | None  # None when not asked


def compare(
    model: torch.nn.Module,
    probe: Batch,
    search_images: torch.Tensor | None,
    probe_cfg: ProbeConfig,
    ttr: TestTimeRegisterConfig | None,
    *,
    top1: Top1 | None = None,
    figures: bool = False,
) -> Comparison:
    """Probe `model` on `probe`; with `ttr`, search register neurons on `search_images` and probe again."""

    def measure() -> ProbeReport:
        report = run_probes(model, probe, probe_cfg, figures=figures)
        if top1 is not None:
            report.scalars[names.VAL_TOP1] = top1(model)
        return report

    baseline = measure()
    if ttr is None or search_images is None:
        return Comparison(baseline, None, None)
    search = find_register_neurons(model, search_images, ttr)
    if not search.neurons:
        return Comparison(baseline, None, search)
    with test_time_register(model, search):
        moved = measure()
    return Comparison(baseline, moved, search)


@torch.no_grad()
def val_top1(model: torch.nn.Module, batches) -> float:
    """Top-1 over one pass of `batches`, in eval mode and fp32 (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct, count = 0, 0
    try:
        for batch in batches:
            correct += int((model(batch.images.float()).argmax(-1) == batch.labels).sum())
            count += len(batch)
    finally:
        model.train(was_training)
    return correct / max(count, 1)


def compare_on_trial(
    model: torch.nn.Module,
    cfg: TrainConfig,
    ttr: TestTimeRegisterConfig | None,
    *,
    device: torch.device | str = "cpu",
    figures: bool = False,
    top1: bool = True,
) -> Comparison:
    """`compare` on the trial's own data (see the module docstring); `model` is built from `cfg`."""
    from trainers.data import build_data

    device = torch.device(device)
    model = model.to(device).eval()
    data = build_data(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed, device=device)
    search_images = next(iter(data.train_batches(0, ttr.images))).images if ttr is not None else None

    def top1_pass(m: torch.nn.Module) -> float:
        return val_top1(m, data.val_batches(cfg.optim.batch_size))

    return compare(
        model, data.probe_batch(cfg.probe.batch_size), search_images, cfg.probe, ttr,
        top1=top1_pass if top1 else None, figures=figures,
    )
