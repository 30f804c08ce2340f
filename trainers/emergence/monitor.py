"""The emergence event and when to probe for it: pure logic on a stream of probe outcomes.

No torch, no I/O: the monitor sees one `Observation` per probe (the scale-free detector's
outlier fraction of the output patch tokens, and their max/median norm ratio) and answers:

* **Has the event happened?** A probe is *flagged* when its outlier fraction is at least
  `min_fraction`. Artifacts have emerged at the first probe step from which every probe is
  flagged, up to and including the K-th regular probe of that run (K = `consecutive`).
  Without adaptive probing every probe is regular: the first of K consecutive flagged probes.
  Adaptive probes (at `every / 8`) only add points: they can move the onset to an earlier
  step of the same run, or break a run whose regular probes looked flagged, but a run is only
  confirmed by K regular probes, so K means the same persistence (K - 1 probe intervals) with
  and without adaptive probing.
* **Is a suspicion open?** From the first flagged probe after a clean one until the run is
  confirmed or a clean probe dismisses it. With adaptive probing the trainer probes every
  `fine` steps while it is open, and on opening it measures the weight snapshots it kept of
  the window since the last clean probe, so the onset is known to `fine` steps.

The state is recomputed from the whole stream at each change (`assess`): streams are short
(a few hundred probes), and the answer does not depend on the order in which the window's
past probes arrive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from trainers.emergence import keys

# Defaults of the spec keys (trainers/config.py ProbeConfig; docs/probes.md says why).
DEFAULT_CONSECUTIVE = 3
DEFAULT_MIN_FRACTION = 0.005
ADAPTIVE_DIVISOR = 8  # adaptive probes come every `every // 8` steps


@dataclass(frozen=True)
class Observation:
    step: int
    outlier_frac: float  # scale-free detector, output patch tokens
    max_over_median: float  # output patch-norm max / median
    regular: bool = True  # at the probe.every cadence (or the final probe); False: adaptive


@dataclass(frozen=True)
class EmergenceRule:
    consecutive: int = DEFAULT_CONSECUTIVE  # K regular probes confirm a run
    min_fraction: float = DEFAULT_MIN_FRACTION

    def __post_init__(self) -> None:
        if self.consecutive < 1 or not 0 < self.min_fraction <= 1:
            raise ValueError(f"consecutive must be >= 1 and 0 < min_fraction <= 1, got {self}")

    def flags(self, observation: Observation) -> bool:
        return observation.outlier_frac >= self.min_fraction


@dataclass(frozen=True)
class Assessment:
    emerged_at: int | None  # the onset step of the first confirmed run
    confirmed_at: int | None  # the probe step that confirmed it
    run_start: int | None  # first step of the flagged run the stream ends in (None: the last probe was clean)
    last_clean: int | None  # step of the last clean probe


def assess(observations: Iterable[Observation], rule: EmergenceRule) -> Assessment:
    emerged_at = confirmed_at = run_start = last_clean = None
    regular_in_run = 0
    for obs in sorted(observations, key=lambda o: o.step):
        if not rule.flags(obs):
            run_start, regular_in_run, last_clean = None, 0, obs.step
            continue
        if run_start is None:
            run_start = obs.step
        regular_in_run += int(obs.regular)
        if emerged_at is None and regular_in_run >= rule.consecutive:
            emerged_at, confirmed_at = run_start, obs.step
    return Assessment(emerged_at, confirmed_at, run_start, last_clean)


class Phase(enum.Enum):
    WATCHING = "watching"  # the last probe was clean (or none yet)
    SUSPECTED = "suspected"  # flagged probes, not yet K regular ones
    EMERGED = "emerged"  # the event is confirmed; nothing more to pin


@dataclass(frozen=True)
class Change:
    """What one batch of observations changed."""

    opened: bool = False  # a suspicion opened
    confirmed: bool = False  # the event was confirmed
    dismissed: bool = False  # a clean probe closed a suspicion


class EmergenceMonitor:
    """The stream of one trial's probes and the decisions drawn from it."""

    def __init__(self, rule: EmergenceRule, *, total_steps: int, every: int = 0, adaptive: bool = False) -> None:
        self.rule = rule
        self.total_steps = total_steps
        self.every = every
        # Adaptive probing needs a regular cadence to refine; every // 8 steps, at least 1.
        self.fine = max(1, every // ADAPTIVE_DIVISOR) if adaptive and every > 1 else 0
        self.observations: list[Observation] = []
        self._assessment = assess((), rule)

    # ------------------------------------------------------------------ state

    @property
    def assessment(self) -> Assessment:
        return self._assessment

    @property
    def phase(self) -> Phase:
        if self._assessment.emerged_at is not None:
            return Phase.EMERGED
        return Phase.SUSPECTED if self._assessment.run_start is not None else Phase.WATCHING

    @property
    def emerged_at(self) -> int | None:
        return self._assessment.emerged_at

    @property
    def last(self) -> Observation | None:
        return max(self.observations, key=lambda o: o.step) if self.observations else None

    def observe(self, *observations: Observation) -> Change:
        """Add probes (in any order, past ones included) and say what changed."""
        before, was = self._assessment, self.phase
        self.observations.extend(observations)
        self._assessment = assess(self.observations, self.rule)
        now = self.phase
        return Change(
            opened=was is Phase.WATCHING and now is not Phase.WATCHING,
            confirmed=before.emerged_at is None and self._assessment.emerged_at is not None,
            dismissed=was is Phase.SUSPECTED and now is Phase.WATCHING,
        )

    # ------------------------------------------------------- probe scheduling

    def on_fine_grid(self, step: int) -> bool:
        return self.fine > 0 and step % self.fine == 0

    def adaptive_probe_due(self, step: int) -> bool:
        """Probe the live model now: a suspicion is open and `step` is on the adaptive grid."""
        return self.on_fine_grid(step) and self.phase is Phase.SUSPECTED

    def snapshot_due(self, step: int) -> bool:
        """Keep the probe model's weights of `step`: no suspicion is open, so a later flagged
        probe may need to look back at this step."""
        return self.on_fine_grid(step) and self.phase is Phase.WATCHING

    def opens_suspicion(self, observation: Observation) -> bool:
        """Would this probe open a suspicion? Then the window's snapshots go in with it."""
        return self.phase is Phase.WATCHING and self.rule.flags(observation)

    def window_start(self) -> int:
        """Steps after this one (the last clean probe, or 0) belong to the open window."""
        last_clean = self._assessment.last_clean
        return 0 if last_clean is None else last_clean

    # ----------------------------------------------------------------- output

    def fraction(self, step: int) -> float:
        return round(step / self.total_steps, 4)

    def status(self) -> str | None:
        """At the end of training: emerged, unconfirmed (flagged, fewer than K probes) or none."""
        if not self.observations:
            return None
        return {Phase.EMERGED: keys.STATUS_EMERGED, Phase.SUSPECTED: keys.STATUS_UNCONFIRMED}.get(
            self.phase, keys.STATUS_NONE
        )

    def report_values(self) -> dict[str, float]:
        """Numbers for the next checkpoint report (console, checkpoint pruner)."""
        values: dict[str, float] = {}
        last = self.last
        if last is not None:
            values[keys.OUTLIER_FRAC] = last.outlier_frac
            values[keys.MAX_OVER_MEDIAN] = last.max_over_median
            values[keys.LAST_PROBE_STEP] = float(last.step)
        last_clean = self._assessment.last_clean
        values[keys.LAST_CLEAN_STEP] = float(-1 if last_clean is None else last_clean)
        values[keys.SUSPECTED] = float(self.phase is Phase.SUSPECTED)
        if self.emerged_at is not None:
            values[keys.EMERGED_AT_STEP_VALUE] = float(self.emerged_at)
            values[keys.EMERGED_AT_FRACTION_VALUE] = self.fraction(self.emerged_at)
        return values

    def event_tags(self) -> dict[str, str]:
        if self.emerged_at is None:
            return {}
        return {
            keys.EMERGED_AT_STEP: str(self.emerged_at),
            keys.EMERGED_AT_FRACTION: f"{self.fraction(self.emerged_at):g}",
            keys.STATUS: keys.STATUS_EMERGED,
        }

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain values (a checkpoint loads with weights_only=True)."""
        return {"observations": [[o.step, o.outlier_frac, o.max_over_median, o.regular] for o in self.observations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows: Sequence[Sequence[Any]] = state.get("observations", [])
        self.observations = [Observation(int(s), float(f), float(r), bool(g)) for s, f, r, g in rows]
        self._assessment = assess(self.observations, self.rule)


def milestone_steps(fractions: Iterable[float], total_steps: int) -> list[int]:
    """Steps at these fractions of training (rounded, at least 1), where checkpoints are kept."""
    return sorted({min(total_steps, max(1, round(f * total_steps))) for f in fractions})
