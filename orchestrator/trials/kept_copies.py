"""The kept checkpoints of a data-parallel trial (resources.workers > 1), kept by its rank 0.

A one-process trial's checkpoints are Tune's, and the driver's CheckpointPruner keeps its
milestones and emergence's neighbours past pruning. A data-parallel trial's checkpoints are
Ray Train's: the driver never sees them as checkpoints (TuneReportCallback passes on a path
only), Ray Train deletes all but its newest few itself (CheckpointConfig.num_to_keep), and a
restore checks that every checkpoint its snapshot lists still exists, so nothing else may
delete one. Rank 0 therefore copies each checkpoint the rules of kept_checkpoints.py may keep
into the trial's `kept_checkpoints/` folder as it writes it, deletes the copies those rules let
go, and tags the run with those kept for good, exactly as the pruner does for one process.

While a monitored trial's window is open (no emergence yet) every new checkpoint is copied,
and the older copies go once a clean probe passes them: one extra checkpoint upload per
checkpoint, and one or two copies on storage at a time, plus those kept for good.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow.fs

from orchestrator.trials.kept_checkpoints import FOR_GOOD, kept_reasons, kept_tags, storage_uri, watch_state

KEPT_FOLDER = "kept_checkpoints"  # inside the Tune trial's directory
_NAME = re.compile(r"checkpoint_(\d{9})$")


class KeptCopies:
    """Copies of a data-parallel trial's checkpoints that outlive Ray Train's pruning."""

    def __init__(self, root: str, filesystem: pyarrow.fs.FileSystem, milestones: list[int], monitored: bool) -> None:
        self.root, self.filesystem = root.rstrip("/"), filesystem
        self.milestones, self.monitored = milestones, monitored
        # step -> the reasons already tagged for good. After a restore, the copies made before it
        # (their tags were sent then; a tag sent twice is harmless).
        self.copies: dict[int, set[str]] = {step: set() for step in self._steps_on_storage()}

    def path(self, step: int) -> str:
        return f"{self.root}/checkpoint_{step:09d}"

    def uri(self, step: int) -> str:
        return storage_uri(self.path(step), self.filesystem.type_name)

    def on_checkpoint(self, step: int, directory: str, report: Mapping[str, Any]) -> dict[str, str]:
        """After rank 0 wrote the checkpoint of `step` into `directory`, with the report it goes
        with: copy it if it may be kept, delete the copies no longer needed; the run's new tags."""
        reasons = kept_reasons([*self.copies, step], self.milestones, watch_state(self.monitored, report))
        if reasons.get(step) and step not in self.copies:
            self.filesystem.create_dir(self.path(step), recursive=True)
            pyarrow.fs.copy_files(directory, self.path(step), pyarrow.fs.LocalFileSystem(), self.filesystem)
            self.copies[step] = set()
        tags: dict[str, str] = {}
        for kept in sorted(self.copies):
            why = reasons.get(kept, set())
            if not why:
                self.filesystem.delete_dir(self.path(kept))
                del self.copies[kept]
                continue
            new = (why & set(FOR_GOOD)) - self.copies[kept]
            if new:
                self.copies[kept] |= new
                tags.update(kept_tags(kept, self.uri(kept), new))
        return tags

    def _steps_on_storage(self) -> list[int]:
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True)
        names = (info.base_name for info in self.filesystem.get_file_info(selector))
        return sorted(int(match.group(1)) for match in map(_NAME.match, names) if match)
