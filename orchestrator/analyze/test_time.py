"""Test-time registers beside trained ones (Jiang et al., arXiv 2506.08010; trainers/test_time).

Every finished trial without registers is loaded at its final checkpoint (the run's
`checkpoint_uri` tag); on the trial's own data we search its register neurons (the generic
defaults: the scale-free detector at the last block, top 10 units in the first two thirds of
the blocks), add one test-time register, and measure the register metrics again: output
outlier fraction, [CLS] attention entropy and total variation, corloc, mIoU (same probe batch
as the trial's own probes) and val top-1. The report then puts "no registers", "test-time
register" and "N trained registers" side by side. The model is measured once more without
the register, so every trial's test-time numbers have a baseline from the same checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.load import Sweep, Trial
from orchestrator.analyze.registers import setting_label, t_interval, with_groups
from orchestrator.stores.trial_checkpoints import StoreError, trial_checkpoint

MOVED, NOTHING, UNREADABLE = "moved", "no outliers to move", "no checkpoint"
TTR_ROW = "test-time register"
STATS_COLUMNS = ["model_size", "steps", "metric", "n", "mean", "ci_low", "ci_high"]
LOGGED_MISMATCH = 1e-4  # re-measured vs logged output outlier fraction: more than this is worth a caveat


@dataclass
class TestTimeComparison:
    __test__ = False  # not a pytest class

    trials: pd.DataFrame  # one row per no-register trial: axes, status, neurons, baseline_<metric>, ttr_<metric>
    stats: pd.DataFrame  # STATS_COLUMNS over the seeds of the trials whose neurons were moved
    notes: list[str] = field(default_factory=list)  # caveats for the report


def compare_trials(sweep: Sweep, *, device: str | None = None) -> TestTimeComparison:
    """Apply a test-time register to every no-register trial of `sweep` (see the module docstring)."""
    import torch

    from trainers.pretrained import WeightsError, load_trial_checkpoint
    from trainers.test_time import TestTimeRegisterConfig
    from trainers.test_time.compare import compare_on_trial

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="analysis-checkpoints-") as cache:
        for trial in sorted((t for t in sweep.trials if t.num_registers == 0), key=_order):
            row: dict[str, object] = {"run_id": trial.run_id, "model_size": trial.model_size, "steps": trial.steps, "seed": trial.seed}
            try:
                path, _ = trial_checkpoint(sweep.tracking_uri, trial.run_id, Path(cache))
                loaded = load_trial_checkpoint(path, device)
            except (StoreError, WeightsError) as exc:
                rows.append({**row, "status": UNREADABLE, "reason": str(exc)})
                continue
            result = compare_on_trial(loaded.model, loaded.config, TestTimeRegisterConfig(), device=device)
            search = result.search
            assert search is not None
            row.update({
                "status": MOVED if result.test_time is not None else NOTHING,
                "checkpoint_step": loaded.step,
                "neurons": " ".join(f"{n.layer}:{n.unit}" for n in search.neurons),
                "search_outlier_frac": search.outlier_fraction,
                "search_threshold": search.threshold,
            })
            for spec in cat.REGISTER_METRICS:
                row[f"baseline_{spec.short}"] = result.baseline.scalars.get(spec.key, math.nan)
                row[f"ttr_{spec.short}"] = result.test_time.scalars.get(spec.key, math.nan) if result.test_time else math.nan
            rows.append(row)
    frame = pd.DataFrame(rows)
    return TestTimeComparison(frame, _stats(frame), _notes(frame, sweep))


def _order(trial: Trial) -> tuple:
    return (cat.size_sort_key(trial.model_size), trial.steps, trial.seed)


def _stats(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame or not (frame["status"] == MOVED).any():
        return pd.DataFrame(columns=STATS_COLUMNS)
    moved = frame[frame["status"] == MOVED]
    rows = []
    for (size, steps), group in moved.groupby(["model_size", "steps"], sort=False):
        for spec in cat.REGISTER_METRICS:
            values = group[f"ttr_{spec.short}"].dropna().to_numpy(dtype=float)
            if len(values):
                low, high = t_interval(values)
                rows.append((size, int(steps), spec.short, len(values), float(values.mean()), low, high))
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def _notes(frame: pd.DataFrame, sweep: Sweep) -> list[str]:
    notes: list[str] = []
    if frame.empty:
        return ["No trial without registers: there is nothing to apply a test-time register to."]
    unreadable = frame[frame["status"] == UNREADABLE]
    if len(unreadable):
        notes.append(
            f"Test-time registers: {len(unreadable)} of {len(frame)} no-register trials have no readable checkpoint "
            f"({'; '.join(str(r) for r in unreadable['reason'].head(3))})."
        )
    nothing = frame[frame["status"] == NOTHING]
    if len(nothing):
        notes.append(
            f"Test-time registers: {len(nothing)} of {len(frame)} no-register trials have no outlier patches at the "
            "last block, so there are no register neurons to move (their row says so)."
        )
    measured = frame[frame["status"] != UNREADABLE]
    if len(measured):
        logged = sweep.final_values()
        logged = logged[logged["key"] == cat.OUTPUT_OUTLIER_KEY].set_index("run_id")["value"]
        differ = [r for r in measured.itertuples() if r.run_id in logged.index and abs(logged[r.run_id] - r.baseline_outlier_frac) > LOGGED_MISMATCH]
        if differ:
            notes.append(
                f"{len(differ)} trials measured at their checkpoint give another output outlier fraction than they logged "
                f"at their last probe (e.g. run {differ[0].run_id[:8]}: {differ[0].baseline_outlier_frac:.4g} vs "
                f"{logged[differ[0].run_id]:.4g}): the checkpoint is not the state of the last probe."
            )
    return notes


def comparison_table(stats: pd.DataFrame, ttr: TestTimeComparison, size: str, steps: int) -> pd.DataFrame:
    """Rows 'none', 'test-time register', then each trained count; one column per metric (logged values for trained rows)."""
    def cell(n: int, mean: float, low: float, high: float) -> str:
        return f"{mean:.4g} (n=1)" if n < 2 else f"{mean:.4g} [{low:.4g}, {high:.4g}]"

    sel = with_groups(stats)
    sel = sel[(sel["model_size"] == size) & (sel["steps"] == steps)]
    rows: dict[str, dict[str, str]] = {}
    order_of: dict[str, tuple[int, int]] = {}
    for r in sel.itertuples():
        setting = (int(r.num_registers), int(r.register_depth))
        label = "none" if setting[0] == 0 else f"{setting_label(*setting)} trained"  # '4@3': entering before block 3
        order_of[label] = setting
        rows.setdefault(label, {})[r.metric] = cell(r.n, r.mean, r.ci_low, r.ci_high)
    mine = ttr.stats[(ttr.stats["model_size"] == size) & (ttr.stats["steps"] == steps)]
    trials = ttr.trials[(ttr.trials["model_size"] == size) & (ttr.trials["steps"] == steps)] if not ttr.trials.empty else ttr.trials
    if len(mine):
        rows[TTR_ROW] = {r.metric: cell(r.n, r.mean, r.ci_low, r.ci_high) for r in mine.itertuples()}
    elif len(trials):
        rows[TTR_ROW] = {m.short: ", ".join(sorted(set(trials["status"]))) for m in cat.REGISTER_METRICS}
    order = ["none", TTR_ROW] + sorted((k for k in rows if k.endswith(" trained")), key=lambda k: order_of[k])
    columns = [m.short for m in cat.REGISTER_METRICS if any(m.short in rows[k] for k in rows)]
    table = pd.DataFrame([{"registers": k, **{c: rows[k].get(c, "missing") for c in columns}} for k in order if k in rows])
    return table


def write_outputs(ttr: TestTimeComparison, out: Path) -> None:
    ttr.trials.to_csv(out / "test_time_registers.csv", index=False)
    ttr.stats.to_csv(out / "test_time_stats.csv", index=False)
    (out / "test_time_registers.json").write_text(json.dumps({"notes": ttr.notes, "trials": ttr.trials.to_dict("records")}, indent=2, default=str) + "\n")


INTRO = (
    "Each no-register trial at its final checkpoint with one test-time register (Jiang et al., arXiv 2506.08010): "
    "outlier patches marked at the last block by the scale-free detector, the top 10 MLP units by mean activation "
    "on them in the first two thirds of the blocks, their activations moved into the extra token; measured on the "
    "trial's own probe batch and validation split. `none` and `N trained`: the values the trials logged; mean "
    "[95% interval] over seeds as above. Per-trial numbers, with a baseline re-measured at the same checkpoint, "
    "and the units found: test_time_registers.csv."
)


def report_tables(stats: pd.DataFrame, ttr: TestTimeComparison) -> list[tuple[str, pd.DataFrame]]:
    """(heading, table) per model size and training length that has no-register trials."""
    if ttr.trials.empty:
        return []
    pairs = sorted({(r.model_size, int(r.steps)) for r in ttr.trials.itertuples()}, key=lambda p: (cat.size_sort_key(p[0]), p[1]))
    return [(f"{size}, {steps} training steps", comparison_table(stats, ttr, size, steps)) for size, steps in pairs]
