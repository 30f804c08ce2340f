"""The emergence monitor's logic on recorded and constructed streams of probe outcomes (no torch)."""

from __future__ import annotations

import random

import pytest

from trainers.emergence import keys
from trainers.emergence.monitor import (
    EmergenceMonitor,
    EmergenceRule,
    Observation,
    Phase,
    assess,
    milestone_steps,
)

RULE = EmergenceRule(consecutive=3, min_fraction=0.005)

# Recorded: the output outlier fraction and max/median ratio of the regular probes (every 16
# steps) of a micro ViT trained 96 steps with a register neuron planted from step 37 on
# (tests/planted_training.py; the run of tests/test_emergence_training.py without adaptive probes).
PLANTED_RECORDED = [
    (16, 0.0, 3.1), (32, 0.0, 5.7), (48, 0.1016, 26.0), (64, 0.0430, 24.2), (80, 0.0430, 24.2), (96, 0.0430, 24.2),
]
# Recorded the same way with adaptive probes (every 2 steps) between 32 and 64.
PLANTED_ADAPTIVE_RECORDED = [
    (34, 0.0, 5.6), (36, 0.0, 5.6), (38, 0.158, 30.1), (40, 0.143, 29.0), (42, 0.088, 27.0), (44, 0.082, 26.8), (46, 0.080, 26.4),
    (50, 0.086, 26.0), (52, 0.088, 26.1), (54, 0.092, 26.2), (56, 0.080, 25.9), (58, 0.080, 25.0), (60, 0.057, 24.5), (62, 0.043, 24.3),
]


def regular(stream) -> list[Observation]:
    return [Observation(step, frac, ratio) for step, frac, ratio in stream]


def fed(stream, rule=RULE, total=96, **kwargs) -> EmergenceMonitor:
    monitor = EmergenceMonitor(rule, total_steps=total, **kwargs)
    for obs in stream:
        monitor.observe(obs)
    return monitor


def test_a_clean_stream_never_emerges_and_says_so() -> None:
    monitor = fed(regular([(s, 0.0, 1.8) for s in range(10, 101, 10)]), total=100)
    assert monitor.emerged_at is None and monitor.phase is Phase.WATCHING
    assert monitor.status() == keys.STATUS_NONE
    assert monitor.report_values()[keys.LAST_CLEAN_STEP] == 100
    assert monitor.event_tags() == {}


def test_no_probe_no_status() -> None:
    assert fed([]).status() is None


def test_the_recorded_planted_stream_emerges_at_its_first_flagged_probe() -> None:
    changes = []
    monitor = EmergenceMonitor(EmergenceRule(consecutive=2), total_steps=96)
    for obs in regular(PLANTED_RECORDED):
        changes.append(monitor.observe(obs))
    assert monitor.emerged_at == 48
    assert monitor.assessment.confirmed_at == 64
    assert [c.opened for c in changes] == [False, False, True, False, False, False]
    assert [c.confirmed for c in changes] == [False, False, False, True, False, False]
    assert monitor.event_tags() == {keys.EMERGED_AT_STEP: "48", keys.EMERGED_AT_FRACTION: "0.5", keys.STATUS: "emerged"}
    assert monitor.report_values()[keys.EMERGED_AT_FRACTION_VALUE] == 0.5


def test_adaptive_probes_pin_the_onset_to_their_resolution() -> None:
    monitor = EmergenceMonitor(EmergenceRule(consecutive=2), total_steps=96, every=16, adaptive=True)
    assert monitor.fine == 2
    recorded = regular(PLANTED_RECORDED)
    window = [Observation(s, f, r, regular=False) for s, f, r in PLANTED_ADAPTIVE_RECORDED]
    monitor.observe(*recorded[:2])
    assert monitor.snapshot_due(34) and not monitor.adaptive_probe_due(34)
    assert monitor.opens_suspicion(recorded[2]) and monitor.window_start() == 32
    # The window since the last clean probe (from snapshots) arrives with the flagged probe at 48.
    change = monitor.observe(*[o for o in window if o.step < 48], recorded[2])
    assert change.opened and not change.confirmed
    assert monitor.phase is Phase.SUSPECTED and monitor.assessment.run_start == 38
    assert monitor.adaptive_probe_due(50) and not monitor.snapshot_due(50)
    monitor.observe(*[o for o in window if o.step > 48])
    assert monitor.emerged_at is None  # adaptive probes alone never confirm: K counts regular probes
    assert monitor.observe(recorded[3]).confirmed
    assert monitor.emerged_at == 38 and monitor.assessment.confirmed_at == 64
    assert not monitor.adaptive_probe_due(66) and not monitor.snapshot_due(66)  # nothing left to pin


def test_the_answer_does_not_depend_on_the_order_the_window_arrives_in() -> None:
    stream = regular(PLANTED_RECORDED) + [Observation(s, f, r, regular=False) for s, f, r in PLANTED_ADAPTIVE_RECORDED]
    rule = EmergenceRule(consecutive=2)
    expected = assess(stream, rule)
    for seed in range(5):
        shuffled = stream[:]
        random.Random(seed).shuffle(shuffled)
        assert assess(shuffled, rule) == expected


def test_a_clean_adaptive_probe_breaks_a_run_the_regular_probes_saw_flagged() -> None:
    # Regular probes flag at 20, 30, 40 (K = 3), but an adaptive probe at 32 is clean: a flicker.
    stream = regular([(10, 0.0, 2.0), (20, 0.02, 9.0), (30, 0.02, 9.0), (40, 0.02, 9.0)])
    assert assess(stream, RULE).emerged_at == 20
    stream.append(Observation(32, 0.0, 2.0, regular=False))
    broken = assess(stream, RULE)
    assert broken.emerged_at is None and broken.run_start == 40 and broken.last_clean == 32


def test_with_k_1_the_window_still_moves_the_onset() -> None:
    monitor = EmergenceMonitor(EmergenceRule(consecutive=1), total_steps=80, every=16, adaptive=True)
    monitor.observe(Observation(16, 0.0, 2.0))
    change = monitor.observe(Observation(18, 0.0, 2.0, False), Observation(20, 0.01, 9.0, False), Observation(32, 0.02, 9.0))
    assert change.opened and change.confirmed
    assert monitor.emerged_at == 20


NOISY_SEED = 7


def noisy_stream(length: int = 200, every: int = 10) -> list[Observation]:
    """A long run whose detector now and then flags a stray token or two: fractions in [0, 0.004]
    (1-2 tokens of a 512-token probe batch), ratios around 3-4, and short bursts of real-looking
    flags: 1 or 2 probes (fewer than K = 3) at 0.6-2% with a ratio of 6-12, each followed by a
    probe below the minimum fraction."""
    rng = random.Random(NOISY_SEED)
    values: list[tuple[float, float]] = []
    while len(values) < length:
        if rng.random() < 0.08:
            values += [(rng.uniform(0.006, 0.02), rng.uniform(6, 12)) for _ in range(rng.choice((1, 2)))]
        values.append((rng.choice((0.0, 0.0, 0.0, 0.002, 0.004)), rng.uniform(2.5, 4.2)))
    return [Observation((i + 1) * every, frac, ratio) for i, (frac, ratio) in enumerate(values)]


def test_a_noisy_stream_with_short_bursts_never_triggers() -> None:
    stream = noisy_stream()
    flagged = [o for o in stream if RULE.flags(o)]
    assert len(flagged) >= 10  # the bursts are there...
    monitor = fed(stream, total=stream[-1].step)
    assert monitor.emerged_at is None  # ...but none lasts K probes
    assert monitor.status() in (keys.STATUS_NONE, keys.STATUS_UNCONFIRMED)
    # The same stream with a sustained rise at the end does trigger, at the rise.
    rise = stream[-1].step + 10
    monitor.observe(*regular([(rise + 10 * i, 0.03, 15.0) for i in range(3)]))
    assert monitor.emerged_at == rise


def test_stray_tokens_below_the_minimum_fraction_are_no_flags() -> None:
    stream = regular([(s, 0.004, 4.5) for s in range(10, 301, 10)])  # 2 tokens of 512, every probe
    assert fed(stream, total=300).emerged_at is None


def test_monitor_state_round_trips_through_a_checkpoint() -> None:
    monitor = fed(regular(PLANTED_RECORDED[:3]), rule=EmergenceRule(consecutive=2), every=16, adaptive=True)
    again = EmergenceMonitor(EmergenceRule(consecutive=2), total_steps=96, every=16, adaptive=True)
    again.load_state_dict(monitor.state_dict())
    assert again.assessment == monitor.assessment and again.phase is Phase.SUSPECTED
    assert all(isinstance(v, (int, float, bool)) for row in monitor.state_dict()["observations"] for v in row)


def test_adaptive_needs_a_cadence_to_refine() -> None:
    assert EmergenceMonitor(RULE, total_steps=10, every=0, adaptive=True).fine == 0
    assert EmergenceMonitor(RULE, total_steps=100, every=50, adaptive=True).fine == 6
    assert EmergenceMonitor(RULE, total_steps=100, every=4, adaptive=True).fine == 1


def test_milestones_are_steps_of_the_training_length() -> None:
    assert milestone_steps([0.25, 0.5, 0.75], 300) == [75, 150, 225]
    assert milestone_steps([0.001, 1.0], 100) == [1, 100]


@pytest.mark.parametrize("consecutive,fraction", [(0, 0.01), (3, 0.0), (3, 1.5)])
def test_a_bad_rule_is_refused(consecutive, fraction) -> None:
    with pytest.raises(ValueError):
        EmergenceRule(consecutive, fraction)
