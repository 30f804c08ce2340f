"""What a trial measures, carried from its worker to the driver inside Tune's reports.

Trial workers never import MLflow: its import and its SQLAlchemy store cost each worker
about 3 CPU-seconds on the way to the first training step (docs/performance.md). The
worker buffers metrics (with the time each was measured), probe files and tags here and
hands them over with the report of each checkpoint; the driver's Tune callback
(orchestrator/trials/mlflow_logger.py) writes them to the trial's MLflow run. Records and checkpoint
travel in one report, so the steps after the last checkpoint, which a retry measures
again, were never written.

The records travel as JSON types only (`TrialRecords.to_report`: lists, strings, numbers; probe
files base64-encoded): Ray Train's controller keeps every report's metrics in its checkpoint
manager's state and writes that state as JSON (pydantic), so raw bytes there fail a
multi-worker trial at its first probe ("invalid utf-8 sequence"). One-process and
multi-worker trials send the same form; the driver turns it back with `from_report`.

This module is imported by the workers: it must not import MLflow, torch or Tune.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

# The report key under which the records travel; the driver's callback takes it out of
# the result before Tune stores it or its CSV and JSON loggers write it.
RECORDS_KEY = "mlflow_records"

# Tags only the worker knows: where the current attempt runs (to find it on a cluster)
# and the step its checkpoint restored, if any.
WORKER_PID_TAG = "worker.pid"
WORKER_HOST_TAG = "worker.host"
RESTORED_TAG = "restored_from_step"


@dataclass
class TrialRecords:
    # (key, value, timestamp in ms, step): MLflow's Metric fields, measured in the worker.
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    # (artifact folder, file name, bytes): probe tables and figures.
    files: list[tuple[str, str, bytes]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.metrics or self.files or self.tags)

    def to_report(self) -> dict[str, Any]:
        """The records as JSON types only, for a report (see the module's docstring)."""
        return {
            "metrics": [[key, value, timestamp, step] for key, value, timestamp, step in self.metrics],
            "files": [[folder, name, base64.b64encode(data).decode("ascii")] for folder, name, data in self.files],
            "tags": dict(self.tags),
        }

    @classmethod
    def from_report(cls, report: Mapping[str, Any] | None) -> "TrialRecords":
        """Records back from `to_report`'s form (empty records for None)."""
        if not report:
            return cls()
        return cls(
            metrics=[(str(key), float(value), int(ts), int(step)) for key, value, ts, step in report.get("metrics", ())],
            files=[(folder, name, base64.b64decode(data)) for folder, name, data in report.get("files", ())],
            tags={str(key): str(value) for key, value in report.get("tags", {}).items()},
        )


class RecordBuffer:
    """A trainers.tracking.Tracker that keeps everything until the next report takes it."""

    def __init__(self) -> None:
        self._records = TrialRecords()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._records.metrics.extend((key, float(value), now, step) for key, value in metrics.items())

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        self._records.files.extend((artifact_dir, name, data) for name, data in files.items())

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._records.tags.update({key: str(value) for key, value in tags.items()})

    def take(self) -> dict[str, Any]:
        """Everything buffered since the last take, in the JSON-safe report form (TrialRecords.to_report)."""
        records, self._records = self._records, TrialRecords()
        return records.to_report()
