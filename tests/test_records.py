"""A trial's records travel in its reports as JSON types only: Ray Train's controller writes every
report's metrics as JSON (its checkpoint manager's state), so probe files as raw bytes failed
every multi-worker trial at its first probe (issue 22, item 2). The driver writes the same
MLflow files as before."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic_core
import pytest

from orchestrator.trials.records import RECORDS_KEY, RecordBuffer, TrialRecords
from test_failures import UnitTrial, unit_logger
from trainers.probes import names

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80"  # not UTF-8, as every real figure


def buffered() -> RecordBuffer:
    buffer = RecordBuffer()
    buffer.set_tags({"worker.pid": "42"})
    buffer.log_metrics({names.TRAIN_LOSS: 0.5, "probe/seconds": float("nan")}, 10)
    buffer.log_files({"norms.png": PNG, "table.json": b"{}"}, names.artifact_dir(10))
    return buffer


def test_a_report_with_probe_files_serialises_as_ray_train_writes_it() -> None:
    report = {"step": 10, "val/top1": 0.5, RECORDS_KEY: buffered().take()}
    with pytest.raises(UnicodeDecodeError):
        PNG.decode("utf-8")  # what failed before: pydantic writes bytes as UTF-8 text
    pydantic_core.to_json(report)  # the serialiser of Ray Train's checkpoint manager state
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState

    text = _TrainingResultState(checkpoint_dir_name="checkpoint_000000010", metrics=report).model_dump_json()
    assert json.loads(text)["metrics"][RECORDS_KEY]["tags"] == {"worker.pid": "42"}
    json.dumps(report)  # and the standard library's, for Tune's own result files


def test_records_come_back_whole_from_the_report_form() -> None:
    records = TrialRecords.from_report(json.loads(json.dumps(buffered().take())))
    assert records.tags == {"worker.pid": "42"}
    assert [(key, step) for key, _, _, step in records.metrics] == [(names.TRAIN_LOSS, 10), ("probe/seconds", 10)]
    assert {name: data for _, name, data in records.files} == {"norms.png": PNG, "table.json": b"{}"}
    assert not TrialRecords.from_report(None) and not TrialRecords.from_report(RecordBuffer().take())


def test_the_driver_writes_the_probe_files_byte_for_byte(tmp_path: Path) -> None:
    client, experiment_id, callback = unit_logger(tmp_path)
    trial = UnitTrial("t1", "")
    callback.on_trial_start(0, [], trial)
    result = {"step": 10, RECORDS_KEY: buffered().take()}
    callback.on_trial_result(0, [], trial, result)
    assert RECORDS_KEY not in result
    (run,) = client.search_runs([experiment_id])
    folder = client.download_artifacts(run.info.run_id, names.artifact_dir(10), str(tmp_path / "out"))
    assert Path(folder, "norms.png").read_bytes() == PNG and Path(folder, "table.json").read_bytes() == b"{}"
    assert run.data.tags["worker.pid"] == "42"
    assert [m.value for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)] == [0.5]
