"""The quickstart's own trials grow no artifacts, and the emergence watch flags none: its config
(sweeps/quickstart.yaml through load_spec and the plan), trained in-process on one CPU thread as
a trial runs under Ray, with the spec's probes and adaptive probing as shipped."""

from __future__ import annotations

import pytest
import torch

from test_quickstart_learns import quickstart_trial_of
from trainers.emergence import keys
from trainers.loop import Trainer
from trainers.tracking import MemoryTracker

pytestmark = pytest.mark.slow


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", ["micro", "mini"])
@pytest.mark.parametrize("steps,num_registers", [(100, 0), (300, 0), (300, 16)])
def test_quickstart_trials_are_not_flagged(size: str, steps: int, num_registers: int, one_thread: None) -> None:
    cfg = quickstart_trial_of(size, steps, num_registers).config
    assert cfg.probe.monitor and cfg.probe.adaptive and cfg.probe.every > 0  # the watch as the spec ships it
    tracker = MemoryTracker()
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit(tracker)
    stream = tracker.history(keys.OUTLIER_FRAC)
    ratios = [v for _, v in tracker.history(keys.MAX_OVER_MEDIAN)]
    assert [s for s, _ in stream] == list(range(cfg.probe.every, cfg.steps + 1, cfg.probe.every))  # no adaptive probe
    assert max(v for _, v in stream) < cfg.probe.emergence_min_fraction, stream
    assert tracker.tags[keys.STATUS] == keys.STATUS_NONE and keys.EMERGED_AT_STEP not in tracker.tags
    assert trainer.watch.adaptive_probes == 0 and trainer.watch.snapshots_taken > 0
    print(f"\n{size} r{num_registers} {steps} steps: output outlier share max {max(v for _, v in stream):.4f}, "
          f"max/median norm up to {max(ratios):.2f}x")
