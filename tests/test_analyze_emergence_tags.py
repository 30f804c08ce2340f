"""The analysis's emergence map reads each trial's own emergence tags (trainers/emergence/keys.py)."""

from __future__ import annotations

from orchestrator.analyze.emergence import emergence_points, emergence_table
from orchestrator.analyze.load import load_sweep
from planted_store import plant_sweep


def test_the_map_takes_when_from_the_trials_tags_and_where_from_the_histories(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The histories say: mini from 40% of training (step 40 of 100), micro never. The trials' own
    # watches say otherwise on purpose, so that the test sees which one the map reads:
    # mini emerged at 31, 35 and 33 (median 33); micro in one seed of three (not half: none).
    tags = {("mini", 0): 31, ("mini", 1): 35, ("mini", 2): 33, ("micro", 0): 50, ("micro", 1): None, ("micro", 2): None}
    plant_sweep(uri, registers=(0,), lengths=(100,), probe_files=False, unfinished=False, emergence_tags=tags)
    sweep = load_sweep("planted", uri)
    assert {(t.model_size, t.seed): (t.emergence_status, t.emerged_at_step) for t in sweep.trials}[("mini", "1")] == ("emerged", 35)
    micro, mini = emergence_points(sweep, threshold=0.01)
    assert (mini.status, mini.step, mini.fraction, mini.source) == ("emerged", 33, 0.33, "tags")
    assert (mini.seeds_emerged, mini.seeds_watched) == (3, 3)
    assert mini.block == 3  # where: still the histories at the last probe
    assert (micro.status, micro.step, micro.seeds_emerged, micro.seeds_watched) == ("none", None, 1, 3)
    table = emergence_table([micro, mini]).set_index("model_size")
    assert table.loc["mini", "seeds_emerged"] == "3/3" and table.loc["mini", "when_from"] == "trial tags"
    assert table.loc["micro", "artifacts"] == "no" and table.loc["micro", "emergence_step"] == "none"


def test_runs_without_tags_keep_the_threshold_on_the_histories(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plant_sweep(uri, sizes=("mini",), registers=(0,), lengths=(100,), probe_files=False, unfinished=False)
    (mini,) = emergence_points(load_sweep("planted", uri), threshold=0.01)
    assert (mini.status, mini.step, mini.source, mini.seeds_emerged) == ("emerged", 40, "histories", None)
    assert emergence_table([mini]).loc[0, "when_from"] == "probe histories"


def test_a_trial_stopped_on_emergence_counts_in_the_map_but_not_in_the_final_length_tables(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from orchestrator.analyze.registers import register_stats
    from trainers.emergence import keys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {("mini", 0): 31, ("mini", 1): 35, ("mini", 2): 33}
    plant_sweep(uri, sizes=("mini",), registers=(0, 4), lengths=(100,), probe_files=False, unfinished=False,
                emergence_tags=tags)
    client = MlflowClient(uri)
    # probe.on_emergence: stop ends the no-register trial of seed 1 where its event is confirmed.
    stopped_run = next(
        r for r in client.search_runs([client.get_experiment_by_name("planted").experiment_id])
        if r.data.tags.get("axis.num_registers") == "0" and r.data.tags.get("axis.seed") == "1"
    )
    client.set_tag(stopped_run.info.run_id, keys.STOPPED_AT_STEP, "40")
    client.set_tag(stopped_run.info.run_id, keys.STOP_REASON, "artifacts emerged at step 35 (confirmed at step 40)")

    sweep = load_sweep("planted", uri)
    assert stopped_run.info.run_id not in {t.run_id for t in sweep.trials}
    assert [t.run_id for t in sweep.stopped] == [stopped_run.info.run_id]
    assert any(s.run_id == stopped_run.info.run_id and s.stopped_at_step == 40 for s in sweep.skipped)
    (mini,) = emergence_points(sweep, threshold=0.01)
    assert (mini.seeds_emerged, mini.seeds_watched, mini.step) == (3, 3, 33)  # the stopped seed still counts
    stats = register_stats(sweep)
    assert set(stats[stats["num_registers"] == 0]["n"]) == {2}  # but not among the 100-step results
