"""What every report to Tune carries: the latest value of each metric the trial has measured.

A trial reports at every checkpoint point (each evaluation, every `checkpoint_every` steps,
the end), and Tune hands each report to the search and the scheduler, which read one metric
from it; a report without that metric stops the whole sweep (Ray 2.60's
`TuneController._validate_result_metrics`). Checkpoints often come before the first
evaluation or probe (all four GPU specs checkpoint more often than they evaluate), so a
report carries the latest value of every scalar (train/loss, val/*, probe/*), and a metric
that the sweep's search or scheduler needs and that was never measured yet is measured at
that report (an evaluation or a probe at that step, logged like any other). Which metrics can
be needed at all is settled when the spec loads (orchestrator/spec/metrics.py).

The latest values are saved beside each checkpoint, so a restored trial reports them too.
Imported by trial workers: no MLflow, no torch at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from orchestrator.trials.records import RecordBuffer
from trainers.probes import names

# Beside the model state in every checkpoint: the metrics reported with it, reported again
# when a restored trial turns out to be complete, and carried on by a restored trial.
REPORTED_METRICS_FILE = "reported_metrics.json"


class LatestMetrics:
    """A trainers.tracking.Tracker in front of the trial's RecordBuffer: everything goes on to
    the buffer (and so to MLflow), and the latest value of each scalar stays here for the reports."""

    def __init__(self, buffer: RecordBuffer, latest: Mapping[str, float] | None = None) -> None:
        self.buffer = buffer
        self.latest: dict[str, float] = dict(latest or {})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.latest.update({key: float(value) for key, value in metrics.items()})
        self.buffer.log_metrics(metrics, step)

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        self.buffer.log_files(files, artifact_dir)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.buffer.set_tags(tags)  # the emergence watch's event tags, among others

    def save(self, directory: str | Path) -> None:
        Path(directory, REPORTED_METRICS_FILE).write_text(json.dumps(self.latest))

    @staticmethod
    def saved(directory: str | Path) -> dict[str, float]:
        """The metrics saved with a checkpoint ({} for a checkpoint written before they were)."""
        path = Path(directory, REPORTED_METRICS_FILE)
        return json.loads(path.read_text()) if path.exists() else {}


def measure_missing(trainer: Any, tracker: LatestMetrics, needed: Sequence[str]) -> None:
    """Measure now what the search or scheduler needs and no report has carried yet.

    trainer: a trainers.loop.Trainer (rank 0 under data parallelism: the only rank that
    evaluates and probes). train/loss needs nothing here: the spec refuses a log_every that
    would leave the first report without it."""
    missing = [metric for metric in needed if metric not in tracker.latest]
    if any(metric.startswith("val/") for metric in missing):
        tracker.log_metrics(trainer.evaluate(), trainer.step)
    if any(metric.startswith(f"{names.PREFIX}/") for metric in missing):
        trainer.probe(tracker)
