"""The quickstart learns: its own config (sweeps/quickstart.yaml, through load_spec and the
plan, so a change to the spec is what gets tested) trains the smaller model at the longest
training length well past chance (1/6) on the validation split.

In-process with trainers.loop.Trainer on one CPU thread, as a trial runs under Ray
(resources cpu: 1); no Ray, no MLflow. About 7 s (no registers) and 11 s (16 registers,
the most tokens) on an idle core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.spec.plan import TrialPlan, make_plan
from orchestrator.spec.schema import load_spec
from trainers.loop import Trainer
from trainers.probes import names

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
MIN_TOP1 = 0.8


def quickstart_trial(num_registers: int) -> TrialPlan:
    """The quickstart's trial of its first model size at its longest length, first seed."""
    plan = make_plan(load_spec(QUICKSTART))
    return quickstart_trial_of(plan.spec.grid["model.size"][0], max(t.config.steps for t in plan.trials), num_registers)


def quickstart_trial_of(size: str, steps: int, num_registers: int) -> TrialPlan:
    """The quickstart's trial of this size, length and register count, first seed."""
    plan = make_plan(load_spec(QUICKSTART))
    seed = plan.spec.seeds[0]
    (trial,) = [
        t
        for t in plan.trials
        if (t.config.model.size, t.config.steps, t.config.seed, t.config.model.num_registers)
        == (size, steps, seed, num_registers)
    ]
    return trial


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_registers", [0, 16])
def test_quickstart_model_learns_at_its_longest_length(num_registers: int, one_thread: None) -> None:
    cfg = quickstart_trial(num_registers).config  # probes on, every 50 steps, as the quickstart runs
    metrics = Trainer(cfg, torch.device("cpu")).fit()
    chance = 1 / cfg.data.num_classes
    assert metrics[names.VAL_TOP1] >= MIN_TOP1, (
        f"{cfg.model.label} with {num_registers} registers at {cfg.steps} steps: val top-1 "
        f"{metrics[names.VAL_TOP1]:.3f} (chance {chance:.3f}, needed {MIN_TOP1})"
    )
