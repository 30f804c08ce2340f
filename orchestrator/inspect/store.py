"""MLflow for the inspection: one run per model variant and one for the report.

The inspection experiment holds one run per inspected model (and one per test-time-register
variant), tagged `sweep.role=inspection`, so a sweep analysis never counts them as trials,
plus one `inspection-report` run with the side-by-side report.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from orchestrator.stores.mlflow_runs import ROLE_TAG, get_or_create_experiment
from orchestrator.stores.mlflow_store import open_client
from orchestrator.stores.mlflow_uri import default_tracking_uri
from trainers.probes import names

INSPECTION_ROLE = "inspection"
REPORT_ROLE = "inspection-report"
PROBE_STEP = 0  # a pretrained model is probed once; its files sit under probes/step_0000000/


def tracking_uri(explicit: str | None) -> str:
    return explicit or default_tracking_uri()


class InspectionStore:
    """Writes the inspection experiment. Created only after every model loaded and was probed."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.client = open_client(uri)  # a new SQLite store is created safely beside other processes
        self.uri = uri
        self.experiment = experiment
        self.experiment_id = get_or_create_experiment(self.client, experiment)

    def log_model_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, object],
        scalars: Mapping[str, float],
        files: Mapping[str, bytes],
        extra_files: Mapping[str, bytes] | None = None,
    ) -> str:
        """One finished run holding a probe's metrics (step 0) and files (probes/step_0000000/)."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={ROLE_TAG: INSPECTION_ROLE, **tags})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, PROBE_STEP) for k, v in scalars.items()]
        param_list = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, max(len(metrics), 1), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000], params=param_list if start == 0 else [])
        self._log_files(run_id, files, names.artifact_dir(PROBE_STEP))
        if extra_files:
            self._log_files(run_id, extra_files, "")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_report(self, folder: Path, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name="inspection-report", tags={ROLE_TAG: REPORT_ROLE, **tags})
        self.client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", "Side-by-side inspection: see report.md")])
        self.client.log_artifacts(run.info.run_id, str(folder))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def _log_files(self, run_id: str, files: Mapping[str, bytes], artifact_dir: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(run_id, tmp, artifact_dir or None)
