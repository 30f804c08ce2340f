"""The input-pipeline benchmarks in reduced form: `bench data` per rank (also from a spec with
workers), the batched crop against one image at a time, and shard reads from a loopback S3 with
a region's latency (many ranged GETs in flight against one at a time). Figures are printed, not
asserted: each run checks its own results (the same bytes, the same shapes) and its JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sweep_helpers import tiny_spec


def last_json(capsys: pytest.CaptureFixture[str]) -> tuple[dict, list[str]]:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_bench_data_speaks_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.bench.__main__ import main

    argv = ["data", "--images", "24", "--batch", "6", "--steps", "1", "--warmup", "1", "--workers", "0",
            "--img", "16", "--patch", "4", "--device", "cpu", "--ranks", "2", "--json"]
    assert main(argv) == 0
    result, lines = last_json(capsys)
    assert result["ranks"] == 2 and result["per_rank_batch"] == 3 and result["images_read_per_rank_per_step"] == 3
    assert result["pipeline_imgs_per_s"] > 0 and result["trainer_imgs_per_s"] > 0
    assert any("(one rank)" in line for line in lines) and any("(one worker, batch 3)" in line for line in lines)


def test_bench_data_takes_a_specs_trial_and_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.bench.__main__ import main

    spec = tiny_spec(tmp_path, resources={"workers": 2, "cpu_per_worker": 1})
    spec["train"]["optim"]["batch_size"] = 12
    spec["train"]["augment"] = {"three_augment": True, "repeats": 3}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    argv = ["data", "--spec", str(tmp_path / "spec.yaml"), "--size", "micro", "--img", "16", "--patch", "4",
            "--steps", "1", "--warmup", "1", "--workers", "0", "--device", "cpu", "--json"]
    assert main(argv) == 0
    result, _ = last_json(capsys)
    # The spec's generated 'shapes' data, 12 positions over 2 ranks, each image 3 times: 2 images per rank.
    assert result["ranks"] == 2 and result["config"]["decode"] == "generated"
    assert result["per_rank_batch"] == 6 and result["images_read_per_rank_per_step"] == 2


def test_crop_bench_runs_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.bench.crops import main

    assert main(["--images", "8", "--width", "40", "--height", "30", "--size", "16", "--device", "cpu",
                 "--repeat", "1", "--json"]) == 0
    result, lines = last_json(capsys)
    assert result["per_image_us"] > 0 and result["batched_us"] > 0
    assert [line.split()[0] for line in lines[:-1]] == ["device", "images", "per_image", "batched", "speedup"]


@pytest.mark.slow  # starts moto's S3 server in a child process
def test_s3_read_bench_in_reduced_form(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.bench.s3_reads import main

    assert main(["--delay-ms", "20", "--images", "48", "--batch", "16", "--batches", "2", "--shard-size", "16", "--json"]) == 0
    result, lines = last_json(capsys)  # run_s3_bench raised if the two readers' bytes differed
    assert result["images"] == 32 and result["gets_in_flight_reader"] <= 32
    assert result["one_get_imgs_per_s"] > 0 and result["in_flight_imgs_per_s"] > 0
    assert any(line.startswith("speedup") for line in lines)
