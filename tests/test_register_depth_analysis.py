"""The register-effect analysis with register depth as a second axis: the rule over (count, depth),
its sentence, the tables and the figure; sweeps without the axis read as before (depth 0)."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.analyze.load import _classify, _RawRun
from orchestrator.analyze.register_figures import register_depth_figure
from orchestrator.analyze.register_tables import depth_grid, depth_grids, metric_table
from orchestrator.analyze.registers import best_counts, recommend, setting_label
from orchestrator.launch.console import axis_header
from orchestrator.stores.mlflow_ui import view_columns
from orchestrator.trials.trainable import axis_tags, trial_config
from trainers.config import ModelConfig
from trainers.cost import forward_macs_per_image

COLUMNS = ["model_size", "steps", "metric", "num_registers", "register_depth", "n", "mean", "ci_low", "ci_high"]


def stats(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


# (registers, depth): mIoU mean and interval, output outlier fraction
PLANTED = {
    (0, 0): (0.50, 0.49, 0.51, 0.030),  # artifacts
    (4, 0): (0.600, 0.592, 0.608, 0.001),  # within the best's interval, clean
    (4, 3): (0.605, 0.598, 0.612, 0.001),  # best
    (4, 6): (0.550, 0.540, 0.560, 0.001),  # clean, but clearly worse
    (4, 9): (0.600, 0.590, 0.610, 0.020),  # within, but the artifacts stay
}


def planted(extra=()) -> pd.DataFrame:
    rows = []
    for (regs, depth), (mean, low, high, outliers) in {**PLANTED, **dict(extra)}.items():
        rows.append(("small", 1000, "miou", regs, depth, 3, mean, low, high))
        rows.append(("small", 1000, "outlier_frac", regs, depth, 3, outliers, outliers - 0.001, outliers + 0.001))
    return stats(rows)


def test_the_rule_covers_the_pair_and_takes_the_latest_clean_entry_of_the_fewest_registers() -> None:
    rec = recommend(planted(), threshold=0.01)
    # (4, 0) and (4, 3) pass (4, 9 keeps its artifacts); 4 registers either way, the later entry costs less.
    assert (rec.num_registers, rec.register_depth, rec.label) == (4, 3, "4@3")
    assert rec.covers_depth and rec.per_size == {"small": 4} and rec.per_size_depth == {"small": 3}
    assert rec.rule.startswith("over the pair (register count, register depth)")
    assert "N registers entering before block k" in rec.rule
    assert any("cannot tell 4@3 registers apart from 4, 4@9 on dense mIoU" in s for s in rec.verdict)
    assert rec.evidence and rec.evidence[0].startswith("small (1000 steps, 3 seeds): 4@3 registers give dense mIoU")
    assert "the best setting, 4@3" in rec.evidence[0]


def test_fewer_registers_win_over_a_later_entry() -> None:
    rec = recommend(planted({(2, 0): (0.601, 0.593, 0.609, 0.002)}), threshold=0.01)
    assert rec.label == "2"


def test_best_setting_per_metric_names_its_depth() -> None:
    [best] = [b for b in best_counts(planted()) if b.metric == "miou"]
    assert (best.best, best.register_depth, best.label) == (4, 3, "4@3")
    assert best.tied_with == ("4", "4@9")  # labels of the settings whose intervals overlap the best's
    [clean] = [b for b in best_counts(planted()) if b.metric == "outlier_frac"]
    assert clean.label == "4@6"  # equal lowest outliers: fewest registers, then the latest entry


def test_a_sweep_without_the_depth_axis_keeps_its_rule_and_tables() -> None:
    rows = [r for r in planted().itertuples(index=False) if r.register_depth == 0]
    old = stats(rows).drop(columns="register_depth")
    rec = recommend(old, threshold=0.01)
    assert (rec.num_registers, rec.register_depth, rec.covers_depth, rec.label) == (4, 0, False, "4")
    assert rec.rule.startswith("the smallest register count whose dense mIoU is within the 95% interval")
    assert list(metric_table(old.assign(objective="supervised"), "small", 1000).columns) == ["objective", "registers", "outlier_frac", "miou"]
    assert depth_grids(old, "small", 1000) == []


def test_tables_take_depth_beside_the_count() -> None:
    frame = planted()
    table = metric_table(frame, "small", 1000)
    assert list(table.columns) == ["objective", "registers", "register_depth", "outlier_frac", "miou"]
    assert list(zip(table["registers"], table["register_depth"])) == [(0, 0), (4, 0), (4, 3), (4, 6), (4, 9)]
    grid = depth_grid(frame, "small", 1000, "outlier_frac")
    assert list(grid.columns) == ["registers", "depth 0", "depth 3", "depth 6", "depth 9"]
    assert list(grid["registers"]) == [0, 4]
    assert grid.iloc[0]["depth 3"] == ""  # no registers: nothing enters at any depth
    assert grid.iloc[1]["depth 9"].startswith("0.02 [")
    assert [spec.short for spec, _ in depth_grids(frame, "small", 1000)] == ["outlier_frac", "miou"]


def test_the_depth_figure_is_drawn_only_for_depth_sweeps(tmp_path) -> None:
    frame = planted().assign(objective="supervised", group="small")
    path = register_depth_figure(frame, {"small": 1000}, tmp_path / "depth.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = frame[frame["register_depth"] == 0]
    assert register_depth_figure(flat, {"small": 1000}, tmp_path / "none.png") is None


def test_the_axis_is_tagged_read_back_and_shown() -> None:
    axes = {"model.num_registers": 4, "model.register_depth": 3}
    tags = axis_tags(trial_config({"model": {"size": "micro"}}, axes), axes)
    assert tags["axis.model.register_depth"] == "3" and tags["axis.num_registers"] == "4"
    assert "tags.`axis.model.register_depth`" in view_columns(axes)
    assert axis_header("model.register_depth") == "reg_depth"

    def run(run_id: str, tags: dict[str, str], params: dict[str, str] | None = None) -> _RawRun:
        study = {"axis.model_size": "micro", "axis.num_registers": "4", "axis.steps": "20", "axis.seed": "0"}
        return _RawRun(run_id, "FINISHED", None, 0, {"trial_id": run_id, **study, **tags}, params or {})

    trials, _, skipped, dropped = _classify([
        run("tagged", {"axis.model.register_depth": "3"}),
        run("param", {}, {"model.register_depth": "2"}),  # not swept in its launch: the config says
        run("old", {}),  # from before the key: registers at the input
    ])
    assert not skipped and not dropped
    by_id = {t.run_id: t for t in trials}
    assert {k: t.register_depth for k, t in by_id.items()} == {"tagged": 3, "param": 2, "old": 0}
    assert all(t.other_axes == () for t in trials)  # a register axis, not pooled with the seeds


def test_labels_and_the_cost_of_late_registers() -> None:
    assert setting_label(4) == "4" and setting_label(4, 3) == "4@3"
    early = forward_macs_per_image(ModelConfig(size="small", num_registers=4), 1000)
    late = forward_macs_per_image(ModelConfig(size="small", num_registers=4, register_depth=6), 1000)
    none = forward_macs_per_image(ModelConfig(size="small"), 1000)
    assert late == pytest.approx((early + none) / 2, abs=1)  # half of the 12 blocks carry them
