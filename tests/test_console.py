"""The sweep's console: progress bar, trial table, one line per finished trial, results table."""

from __future__ import annotations

import io
import pickle

from ray.tune.experiment import Trial

from orchestrator.launch.console import SweepConsole, results_table
from orchestrator.trials.records import RECORDS_KEY, TrialRecords
from trainers.probes import names

AXES = ["model.num_registers", "model.size", "steps", "seed"]


def make_trial(index: int, registers: int, steps: int, status: str = Trial.PENDING, result: dict | None = None) -> Trial:
    axes = {"model.num_registers": registers, "model.size": "micro", "steps": steps, "seed": 0}
    trial = Trial("run_trial", config={"trial": {"index": index, "axes": axes}, "train": {"steps": steps}},
                  trial_id=f"t{index}", stub=True)
    trial.set_status(status)
    if result is not None:
        trial.update_last_result(result)
    return trial


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_the_table_has_the_axes_as_columns_and_running_trials_first() -> None:
    console = SweepConsole(AXES, total_trials=4, stream=Pipe())
    trials = [
        make_trial(0, 0, 60, Trial.TERMINATED, {"step": 60, names.VAL_TOP1: 0.875}),
        make_trial(1, 16, 60, Trial.RUNNING, {"step": 30, names.VAL_TOP1: 0.5}),
        make_trial(2, 4, 120),
    ]
    console.on_trial_result(0, trials, trials[1], {RECORDS_KEY: TrialRecords(metrics=[(names.TRAIN_LOSS, 0.25, 0, 30)]).to_report()})
    bar, header, *rows = console.render(trials)
    assert "1/4 trials done, 1 running, 2 waiting" in bar
    assert header.split() == ["registers", "size", "steps", "seed", "status", "step", "train", "loss", "val", "top-1", "artifacts"]
    assert rows[0].split() == ["16", "micro", "60", "0", "running", "30/60", "0.250", "0.500", "-"]
    assert rows[1].split() == ["0", "micro", "60", "0", "done", "60/60", "-", "0.875", "-"]
    assert rows[2].split()[4:] == ["pending", "-", "-", "-", "-"]


def test_without_a_terminal_it_prints_one_line_per_finished_trial() -> None:
    out = Pipe()
    console = SweepConsole(AXES, total_trials=2, stream=out)
    console.setup()
    first = make_trial(0, 4, 60, Trial.RUNNING, {"step": 60, names.VAL_TOP1: 0.9})
    second = make_trial(1, 8, 60, Trial.RUNNING)
    for _ in range(50):
        console.on_step_end(0, [first, second])  # no redraws into a file
    console.on_trial_complete(0, [first, second], first)  # Tune calls it while the status is RUNNING
    console.on_trial_complete(0, [first, second], first)  # at most once per trial
    second.set_status(Trial.ERROR)
    console.on_trial_error(0, [first, second], second)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("[1/2] done    registers=4  size=micro  steps=60  seed=0  val top-1 0.900")
    assert lines[2].startswith("[2/2] failed  registers=8")


def test_time_left_comes_from_the_steps_done() -> None:
    console = SweepConsole(AXES, total_trials=3)
    trials = [make_trial(0, 0, 100, Trial.TERMINATED, {"step": 100}), make_trial(1, 0, 100, Trial.RUNNING, {"step": 50})]
    # 150 of 300 steps done (the third trial, not created yet, counts as an average one) in 60 s.
    assert console.seconds_left(trials, elapsed=60.0) == 60.0
    assert console.seconds_left([make_trial(0, 0, 100, Trial.RUNNING)], elapsed=5.0) is None


def test_a_restored_console_keeps_its_layout_and_forgets_its_screen() -> None:
    console = SweepConsole(AXES, total_trials=24, stream=Pipe())
    console._drawn_lines = 12
    restored = pickle.loads(pickle.dumps(console))
    assert restored.axis_paths == AXES and restored.total_trials == 24
    assert restored._drawn_lines == 0 and restored.stream is None


def test_results_table_averages_seeds_per_size_length_and_registers() -> None:
    rows = [("mini", 120, 0, 0.8), ("mini", 120, 0, 0.9), ("micro", 120, 4, 0.5), ("micro", 120, 0, None)]
    title, header, micro, mini = results_table(rows)
    assert header.split() == ["size", "steps", "r0", "r4"]
    assert micro.split() == ["micro", "120", "-", "0.500"]
    assert mini.split() == ["mini", "120", "0.850", "-"]


def test_results_table_keeps_objectives_apart() -> None:
    rows = [("micro", 300, 0, 0.99), ("dino micro", 300, 0, 0.78), ("clip micro", 300, 0, 0.73)]
    title, header, *body = results_table(rows)
    assert "DINO: k-NN, CLIP: zero-shot" in title
    assert [line.split()[:-2] for line in body] == [["micro"], ["clip", "micro"], ["dino", "micro"]]


# ------------------------------------------------------------------ artifacts (issue 25)


def watched(frac: float, ratio: float, emerged_at: int | None = None, steps: int = 300, **flags: float) -> dict:
    from trainers.emergence import keys

    result = {keys.OUTLIER_FRAC: frac, keys.MAX_OVER_MEDIAN: ratio, keys.LAST_CLEAN_STEP: 0.0}
    if emerged_at is not None:
        result[keys.EMERGED_AT_STEP_VALUE] = float(emerged_at)
        result[keys.EMERGED_AT_FRACTION_VALUE] = round(emerged_at / steps, 4)
    names_of = {"suspected": keys.SUSPECTED, "alert": keys.ALERT_VALUE, "stopped": keys.STOPPED_VALUE}
    return {**result, **{names_of[k]: v for k, v in flags.items()}}


def test_the_artifacts_column_shows_the_last_probe_and_marks_emergence() -> None:
    from orchestrator.launch.emergence_view import LEGEND

    console = SweepConsole(AXES, total_trials=3, stream=Pipe())
    trials = [
        make_trial(0, 0, 300, Trial.RUNNING, {"step": 200, **watched(0.031, 11.42, emerged_at=126)}),
        make_trial(1, 0, 300, Trial.RUNNING, {"step": 100, **watched(0.012, 7.0, suspected=1.0)}),
        make_trial(2, 4, 300, Trial.RUNNING, {"step": 100, **watched(0.0, 2.13)}),
    ]
    _, header, *rows, legend = console.render(trials)
    assert header.split()[-1] == "artifacts"
    assert rows[0].endswith("3.1% 11.4x *42%")
    assert rows[1].endswith("1.2% 7.0x ?")
    assert rows[2].endswith("0.0% 2.1x")
    assert legend == LEGEND


def test_an_alert_is_one_console_line_and_the_end_line_says_when() -> None:
    out = Pipe()
    console = SweepConsole(AXES, total_trials=2, stream=out)
    console.setup()
    alerting = make_trial(0, 0, 300, Trial.RUNNING, {"step": 150})
    result = {"step": 150, **watched(0.03, 12.0, emerged_at=126, alert=1.0)}
    for _ in range(2):  # every later report carries the alert too: one line
        console.on_trial_result(0, [alerting], alerting, dict(result))
    alerting.update_last_result(result)
    stopping = make_trial(1, 0, 300, Trial.RUNNING)
    stop_result = {"step": 150, **watched(0.03, 12.0, emerged_at=120, stopped=1.0)}
    console.on_trial_result(0, [alerting, stopping], stopping, dict(stop_result))
    stopping.update_last_result(stop_result)
    console.on_trial_complete(0, [alerting, stopping], alerting)
    console.on_trial_complete(0, [alerting, stopping], stopping)
    lines = out.getvalue().splitlines()[1:]
    assert lines[0] == "! artifacts emerged in run_trial_t0 at step 126 (42% of training); training goes on"
    assert lines[1] == "! artifacts emerged in run_trial_t1 at step 120 (40% of training); stopped there"
    assert "artifacts emerged at step 126 (42%)" in lines[2] and lines[2].startswith("[1/2] done ")
    assert lines[3].startswith("[2/2] stopped")
    assert len(lines) == 4


def test_the_end_table_says_whether_and_when_artifacts_emerged() -> None:
    from orchestrator.launch.console import _size_order
    from orchestrator.launch.emergence_view import emergence_row, emergence_table

    rows = [
        emergence_row("mini", 300, 0, watched(0.03, 12.0, emerged_at=120)),
        emergence_row("mini", 300, 0, watched(0.03, 12.0, emerged_at=132)),
        emergence_row("mini", 300, 4, watched(0.0, 2.0)),
        emergence_row("micro", 300, 0, watched(0.03, 12.0, emerged_at=90)),
        emergence_row("micro", 300, 0, watched(0.0, 2.0)),
        emergence_row("micro", 300, 4, None),  # a failed trial that never reported
    ]
    title, header, micro, mini = emergence_table(rows, _size_order)
    assert "fraction of training" in title
    assert header.split() == ["size", "steps", "r0", "r4"]
    assert micro.split() == ["micro", "300", "1/2@0.30", "-"]
    assert mini.split() == ["mini", "300", "0.42", "no"]
    assert emergence_table([emergence_row("micro", 300, 0, {"step": 300})]) == []  # nothing watched: no table
    # A final probe alone cannot confirm anything: no table for trials without probes during training.
    assert emergence_table([emergence_row("micro", 300, 0, watched(0.0, 2.0), probes_in_training=False)]) == []
