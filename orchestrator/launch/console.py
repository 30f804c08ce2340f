"""What a sweep prints while it runs: a progress bar and one compact table of trials.

Tune's own console output (a configuration box per trial, a progress table whose trial
column is cut to "...: 60, 'seed': 0}}") is off unless `--verbose`. Instead this driver-side
callback shows the swept axes as columns, the status, the last reported step, train loss and
val top-1. On a terminal it redraws the bar and the table in place about once a second; when
the output is a file or a pipe (CI, `ray job submit` logs) it prints one line per finished
trial, so a 24-trial sweep stays a few dozen lines long.

The callback is pickled with the Tuner and comes back on a resume: state that belongs to one
process (timers, what is drawn on the screen) is reset in `setup`.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial

from orchestrator.launch import emergence_view
from orchestrator.trials.records import RECORDS_KEY
from trainers.probes import names

# Short column names for the study axes; any other swept key shows its last path component.
AXIS_HEADERS = {
    "model.num_registers": "registers", "model.register_depth": "reg_depth", "model.size": "size", "steps": "steps", "seed": "seed",
}
STATUS_WORDS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "done", "ERROR": "failed"}
REDRAW_SECONDS = 1.0
BAR_WIDTH = 24


def axis_header(path: str) -> str:
    return AXIS_HEADERS.get(path, path.rsplit(".", 1)[-1])


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class TrialRow:
    axes: dict[str, Any]
    status: str
    step: int | None
    train_loss: float | None
    val_top1: float | None
    steps_total: int
    artifacts: str = "-"  # emergence_view.artifacts_cell of the last report


class SweepConsole(Callback):
    def __init__(self, axis_paths: Sequence[str], total_trials: int, stream: TextIO | None = None) -> None:
        self.axis_paths = list(axis_paths)
        self.total_trials = total_trials
        self.stream = stream
        self._reset()

    def _reset(self) -> None:
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn_lines = 0
        self._train_loss: dict[str, float] = {}
        self._announced: set[str] = set()
        self._alerted: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # A resumed launch unpickles this callback in a new process: keep only the layout.
        return {"axis_paths": self.axis_paths, "total_trials": self.total_trials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.axis_paths = state["axis_paths"]
        self.total_trials = state["total_trials"]
        self.stream = None
        self._reset()

    @property
    def out(self) -> TextIO:
        return self.stream or sys.stdout

    @property
    def live(self) -> bool:
        return self.out.isatty()

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info: Any) -> None:
        self._reset()
        if not self.live:
            print(f"Training {self.total_trials} trials; a line for each as it ends:", file=self.out, flush=True)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        # The train loss is among the records a report carries to the MLflow logger (which runs
        # after this callback and takes them out of the result).
        records = result.get(RECORDS_KEY)
        for key, value, _, _ in (records or {}).get("metrics", ()):
            if key == names.TRAIN_LOSS:
                self._train_loss[trial.trial_id] = value
        alert = emergence_view.alert_line(str(trial), result)
        if alert and trial.trial_id not in self._alerted:
            self._alerted.add(trial.trial_id)
            self._say(alert)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.live and time.monotonic() - self._last_draw >= REDRAW_SECONDS:
            self._redraw(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune calls this hook while the trial's status still reads RUNNING.
        self._finished(trials, trial, Trial.TERMINATED)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finished(trials, trial, Trial.ERROR)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.live:
            self._redraw(trials)

    # ------------------------------------------------------------------- drawing

    def _finished(self, trials: list[Trial], trial: Trial, status: str) -> None:
        if self.live:
            self._redraw(trials)
            return
        if trial.trial_id in self._announced:
            return
        self._announced.add(trial.trial_id)
        # Trials a resumed launch restored as finished were never announced by this process.
        done = len(self._announced | {t.trial_id for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)})
        row = self._row(trial, status)
        axes = "  ".join(f"{axis_header(p)}={row.axes.get(p, '')}" for p in self.axis_paths)
        width = len(str(self.total_trials))
        artifacts = emergence_view.emergence_words(trial.last_result or {})
        print(
            f"[{done:>{width}}/{self.total_trials}] {self._status_word(trial, status):<6}  {axes}  "
            f"val top-1 {_num(row.val_top1)}  train loss {_num(row.train_loss)}  "
            + (f"{artifacts}  " if artifacts else "") + f"({self._timing(trials)})",
            file=self.out,
            flush=True,
        )

    def _status_word(self, trial: Trial, status: str) -> str:
        if status == Trial.TERMINATED and emergence_view.stopped(trial.last_result or {}):
            return "stopped"  # ended on emergence (probe.on_emergence: stop), before its full length
        return STATUS_WORDS.get(status, status.lower())

    def _say(self, line: str) -> None:
        """One line above the live table (or in the log): the table is drawn again below it."""
        if self.live and self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0
            self._last_draw = 0.0  # redraw at the next step
        print(line, file=self.out, flush=True)

    def _redraw(self, trials: list[Trial]) -> None:
        lines = self.render(trials)
        height = shutil.get_terminal_size((120, 40)).lines
        if len(lines) > height - 1:
            lines = lines[: height - 2] + [f"  ... {len(lines) - height + 2} more trials"]
        text = ""
        if self._drawn_lines:
            text += f"\x1b[{self._drawn_lines}F\x1b[J"  # back to the first drawn line, clear below
        self.out.write(text + "\n".join(lines) + "\n")
        self.out.flush()
        self._drawn_lines = len(lines)
        self._last_draw = time.monotonic()

    def render(self, trials: list[Trial]) -> list[str]:
        """The progress bar and the table, as lines (running trials first, then by index)."""
        rows = sorted(
            (self._row(t, t.status) for t in trials),
            key=lambda r: (r.status != "RUNNING", r.status == "PENDING"),
        )
        headers = [axis_header(p) for p in self.axis_paths] + ["status", "step", "train loss", "val top-1", "artifacts"]
        body = [
            [str(r.axes.get(p, "")) for p in self.axis_paths]
            + [STATUS_WORDS.get(r.status, r.status.lower()), f"{r.step}/{r.steps_total}" if r.step else "-",
               _num(r.train_loss), _num(r.val_top1), r.artifacts]
            for r in rows
        ]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
        table = [" ".join(cell.rjust(w) for cell, w in zip(headers, widths))]
        table += [" ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in body]
        if any(r.artifacts != "-" for r in rows):
            table.append(emergence_view.LEGEND)
        return [self._bar(trials), *table]

    def _bar(self, trials: list[Trial]) -> str:
        done = sum(1 for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR))
        failed = sum(1 for t in trials if t.status == Trial.ERROR)
        running = sum(1 for t in trials if t.status == Trial.RUNNING)
        waiting = max(self.total_trials - done - running, 0)
        filled = int(BAR_WIDTH * done / max(self.total_trials, 1))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        counts = [f"{done}/{self.total_trials} trials done", f"{running} running", f"{waiting} waiting"]
        if failed:
            counts.append(f"{failed} failed")
        return f"[{bar}] {', '.join(counts)}  ({self._timing(trials)})"

    def _timing(self, trials: list[Trial]) -> str:
        elapsed = time.monotonic() - self._started
        left = self.seconds_left(trials, elapsed)
        return f"{clock(elapsed)} elapsed" + (f", about {clock(left)} left" if left else "")

    def seconds_left(self, trials: list[Trial], elapsed: float) -> float | None:
        """Time left, from the training steps reported so far against all the sweep's steps."""
        done_steps = total_steps = 0
        for trial in trials:
            row = self._row(trial, trial.status)
            total_steps += row.steps_total
            done_steps += row.steps_total if trial.status in (Trial.TERMINATED, Trial.ERROR) else (row.step or 0)
        # Trials Tune has not created yet (a searcher hands them out one by one) count as
        # long as the average trial seen so far.
        unseen = self.total_trials - len(trials)
        if unseen > 0 and trials:
            total_steps += unseen * total_steps / len(trials)
        if done_steps <= 0 or total_steps <= done_steps:
            return None if done_steps <= 0 else 0.0
        return elapsed * (total_steps - done_steps) / done_steps

    def _row(self, trial: Trial, status: str) -> TrialRow:
        config = trial.config
        axes = dict(config.get("trial", {}).get("axes", {}))
        steps = axes.get("steps", config.get("train", {}).get("steps", 0))
        result = trial.last_result or {}
        return TrialRow(
            axes=axes,
            status=status,
            step=result.get("step"),
            train_loss=self._train_loss.get(trial.trial_id),
            val_top1=result.get(names.VAL_TOP1),
            steps_total=int(steps or 0),
            artifacts=emergence_view.artifacts_cell(result),
        )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Val top-1 per (size, training length) and register setting, the mean over seeds and any
    other swept keys. Rows are (size, steps, registers, top1 or None for a failed trial[, register
    depth]); a column is rN, or rN@k for N registers entering before block k."""
    cells: dict[tuple[str, int], dict[tuple[int, int], list[float]]] = {}
    settings: set[tuple[int, int]] = set()
    for size, steps, regs, top1, *depth in rows:
        setting = (regs, depth[0] if depth else 0)
        settings.add(setting)
        values = cells.setdefault((size, steps), {}).setdefault(setting, [])
        if top1 is not None:
            values.append(top1)
    if not cells:
        return []
    columns = sorted(settings)
    headers = ["size", "steps", *(f"r{c}@{d}" if d else f"r{c}" for c, d in columns)]
    body = [
        [size, str(steps), *(_mean(by_setting.get(c, [])) for c in columns)]
        for (size, steps), by_setting in sorted(cells.items(), key=lambda item: (_size_order(item[0][0]), item[0][1]))
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    what = "registers (rN; rN@k: entering before block k)" if any(d for _, d in columns) else "registers (rN)"
    lines = [f"Val top-1 by model size, training length and {what}, mean over seeds"
             " (DINO: k-NN, CLIP: zero-shot):" if any(" " in size for size, *_ in rows) else
             f"Val top-1 by model size, training length and {what}, mean over seeds:"]
    lines.append("  " + " ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines += ["  " + " ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    return lines


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def _size_order(label: str) -> tuple[str, int]:
    """Supervised sizes first, then each objective's ('dino micro'), sizes in MODEL_SIZES order."""
    from trainers.config import MODEL_SIZES

    objective, _, size = label.rpartition(" ")
    order = list(MODEL_SIZES)
    return objective, order.index(size) if size in order else len(order)
