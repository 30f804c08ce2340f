"""Probe artifacts (norms.npz, attention.npz) of a few representative trials.

Only a handful of runs are opened (figures need one or two per size), so the client's
per-run calls are fine here. A missing or unreadable file is None, never an exception:
the report says what was missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.load import Trial
from trainers.probes import names

_STEP_DIR = re.compile(r"step_(\d+)$")
PROBES_ROOT = "probes"


class ArtifactReader:
    """Lists and downloads probe files into a cache folder; remembers what it could not find."""

    def __init__(self, client: MlflowClient, cache_dir: Path) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self.missing: list[str] = []
        self._steps: dict[str, list[int]] = {}

    def probe_steps(self, run_id: str) -> list[int]:
        """Steps with a probes/step_XXXXXXX folder, ascending."""
        if run_id not in self._steps:
            try:
                entries = self.client.list_artifacts(run_id, PROBES_ROOT)
            except Exception:  # an unreachable artifact store reads as "no artifacts"
                entries = []
            found = (_STEP_DIR.search(e.path) for e in entries if e.is_dir)
            self._steps[run_id] = sorted(int(m.group(1)) for m in found if m)
        return self._steps[run_id]

    def load(self, run_id: str, step: int, filename: str) -> dict[str, np.ndarray] | None:
        path = f"{names.artifact_dir(step)}/{filename}"
        try:
            local = self.client.download_artifacts(run_id, path, str(self._run_cache(run_id)))
            with np.load(local) as data:
                return {key: data[key] for key in data.files}
        except Exception as exc:  # missing file, truncated file, store error
            self.missing.append(f"{path} of run {run_id[:8]} ({exc.__class__.__name__})")
            return None

    def latest(self, run_id: str, filename: str) -> tuple[int, dict[str, np.ndarray]] | None:
        """The last probe step's file, or None."""
        for step in reversed(self.probe_steps(run_id)):
            data = self.load(run_id, step, filename)
            if data is not None:
                return step, data
        return None

    def _run_cache(self, run_id: str) -> Path:
        folder = self.cache_dir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def pick_trial(
    reader: ArtifactReader,
    trials: Iterable[Trial],
    *,
    registers: int | None,
    size: str | None = None,
    prefer_registers: int | None = None,
    max_listed: int = 20,
    prefer_depth: int | None = None,
) -> Trial | None:
    """A trial with probe artifacts: the largest size, longest training, given register count.

    registers=None means "any count > 0", preferring `prefer_registers` (entering at `prefer_depth`,
    when given) when it has artifacts; otherwise registers from the input come first.
    At most `max_listed` runs are listed, so a big sweep without artifacts stays fast.
    """
    pool = [
        t
        for t in trials
        if (size is None or t.model_size == size)
        and (t.num_registers == registers if registers is not None else t.num_registers > 0)
    ]

    def rank(t: Trial) -> tuple:
        preferred = 0 if prefer_registers is not None and t.num_registers == prefer_registers else 1
        if preferred == 0 and prefer_depth is not None and t.register_depth != prefer_depth:
            preferred = 1
        size_rank = cat.size_sort_key(t.model_size)
        return (preferred, -size_rank[0], size_rank[1], -t.steps, -t.num_registers, t.register_depth, t.seed)

    for trial in sorted(pool, key=rank)[:max_listed]:
        if reader.probe_steps(trial.run_id):
            return trial
    return None
