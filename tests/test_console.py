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
    assert header.split() == ["registers", "size", "steps", "seed", "status", "step", "train", "loss", "val", "top-1"]
    assert rows[0].split() == ["16", "micro", "60", "0", "running", "30/60", "0.250", "0.500"]
    assert rows[1].split() == ["0", "micro", "60", "0", "done", "60/60", "-", "0.875"]
    assert rows[2].split()[4:] == ["pending", "-", "-", "-"]


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
