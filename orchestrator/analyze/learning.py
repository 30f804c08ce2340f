"""Did the models learn? Val top-1 of each (model size, training length) beside chance.

A register count can only be judged on models that learned their task: the probes of an
untrained ViT measure its initialisation. Chance is 1 / number of classes (from the trial's
`data.num_classes` tag, written by the trainable from the data set it trained on, or for
older runs from the config). The rule, stated in the report:

    a setting learned when its worst trial's val top-1 beats chance by at least
    max(LEARNED_MARGIN_FLOOR, chance), i.e. at least twice chance and 10 points above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.load import Sweep

LEARNED_MARGIN_FLOOR = 0.10
RULE = (
    "a setting learned when its worst trial's val top-1 is above chance (1 / classes) by at least "
    f"max({LEARNED_MARGIN_FLOOR:g}, chance)"
)
COLUMNS = ["objective", "model_size", "steps", "trials", "classes", "chance", "top1_mean", "top1_min", "margin", "learned"]


@dataclass(frozen=True)
class LearningCheck:
    model_size: str
    steps: int
    objective: str
    group: str  # the size, or objective/size when several objectives were swept (as the register stats)
    trials: int  # trials with a final val top-1
    num_classes: int | None
    top1_mean: float | None
    top1_min: float | None

    @property
    def chance(self) -> float | None:
        return 1.0 / self.num_classes if self.num_classes else None

    @property
    def margin(self) -> float | None:
        """The worst trial's top-1 minus chance."""
        if self.chance is None or self.top1_min is None:
            return None
        return self.top1_min - self.chance

    @property
    def required_margin(self) -> float | None:
        return max(LEARNED_MARGIN_FLOOR, self.chance) if self.chance is not None else None

    @property
    def learned(self) -> bool | None:
        """None when the sweep cannot tell (no top-1 logged, or the class count unknown)."""
        if self.margin is None or self.required_margin is None:
            return None
        return self.margin >= self.required_margin

    def sentence(self) -> str:
        where = f"{self.group}, {self.steps} steps"
        if self.top1_mean is None:
            return f"{where}: no val top-1 logged, so whether the models learned is unknown."
        if self.chance is None:
            return f"{where}: val top-1 {self.top1_mean:.3f}, but the number of classes is unknown, so chance is too."
        verdict = "learned" if self.learned else "did NOT learn"
        return (
            f"{where}: {verdict}: val top-1 {self.top1_mean:.3f} (worst trial {self.top1_min:.3f}) against chance "
            f"{self.chance:.3f} ({self.num_classes} classes), a margin of {self.margin:+.3f} "
            f"(needed: {self.required_margin:+.3f})."
        )


def learning_checks(sweep: Sweep) -> list[LearningCheck]:
    trials = sweep.trials_frame()
    final = sweep.final_values()
    top1 = final[final["key"] == cat.METRICS_BY_SHORT["top1"].key].set_index("run_id")["value"] if not final.empty else pd.Series(dtype=float)
    checks = []
    several = trials["objective"].nunique() > 1
    for (objective, size, steps), group in trials.groupby(["objective", "model_size", "steps"]):
        values = top1.reindex(group["run_id"]).dropna()
        classes = {int(c) for c in group["num_classes"].dropna()}
        checks.append(
            LearningCheck(
                model_size=str(size),
                steps=int(steps),
                objective=str(objective),
                group=cat.group_label(str(objective), str(size), several),
                trials=len(values),
                num_classes=classes.pop() if len(classes) == 1 else None,
                top1_mean=float(values.mean()) if len(values) else None,
                top1_min=float(values.min()) if len(values) else None,
            )
        )
    return sorted(checks, key=lambda c: (cat.group_sort_key(c.group), c.steps))


def learning_table(checks: list[LearningCheck]) -> pd.DataFrame:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        [c.objective, c.model_size, c.steps, c.trials, c.num_classes or "?", fmt(c.chance, ".3f"), fmt(c.top1_mean, ".3f"),
         fmt(c.top1_min, ".3f"), fmt(c.margin, "+.3f"), {True: "yes", False: "NO", None: "unknown"}[c.learned]]
        for c in checks
    ]
    return pd.DataFrame(rows, columns=COLUMNS)
