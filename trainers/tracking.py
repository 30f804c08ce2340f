"""Where the trainer sends what it measures: a tiny interface with a no-op default.

The trainer never knows about MLflow or Ray; the orchestrator passes an implementation
(see orchestrator/stores/mlflow_runs.py) and a notebook can pass a list-backed one.
"""

from __future__ import annotations

from typing import Mapping, Protocol


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None: ...

    # Optional: `set_tags(tags: Mapping[str, str])`. A tracker that has it receives the trial's
    # tags as they become known (the emergence event); trainers/emergence/watch.py checks for it.


class NullTracker:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


class MemoryTracker:
    """Keeps everything in lists: for tests and notebooks."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, str, float]] = []
        self.files: dict[str, bytes] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.extend((step, key, float(value)) for key, value in metrics.items())

    def log_files(self, files: Mapping[str, bytes], artifact_dir: str) -> None:
        self.files.update({f"{artifact_dir}/{name}": data for name, data in files.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(step, value) for step, name, value in self.metrics if name == key]
