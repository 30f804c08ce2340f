"""The benchmarks run end to end with tiny settings and end with one JSON line (no timings asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.bench import devices
from orchestrator.bench.overhead import (
    bench_train_config,
    format_overhead_result,
    pair_order,
    summarize_pairs,
    sweep_spec,
)
from orchestrator.bench.timeline import median_step_s, slot_gaps
from orchestrator.spec.schema import parse_spec
from trainers.cost import GPU_MEMORY_GB, match_gpu_name

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench", *args, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trainer_bench_reports_both_loops_and_skips_packing_on_cpu() -> None:
    result = run_bench(
        "trainer", "--device", "cpu", "--size", "micro", "--img", "16", "--patch", "4", "--registers", "2",
        "--batch", "8", "--steps", "2", "--warmup", "1", "--copies", "2", timeout=300,
    )
    for key in ("imgs_per_s", "baseline_imgs_per_s", "speedup", "mfu", "device", "config"):
        assert key in result
    assert result["imgs_per_s"] > 0 and result["baseline_imgs_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["imgs_per_s"] / result["baseline_imgs_per_s"])
    assert result["mfu"] is None and result["device"].startswith("cpu")
    assert result["config"]["size"] == "micro" and result["config"]["batch"] == 8
    assert "skipped" in result["packing"]


def test_the_plain_loop_runs_without_tf32_even_after_the_trainer_turned_it_on(monkeypatch) -> None:
    """The Trainer sets TF32 process-wide on a GPU; the fp32 baseline must not inherit it."""
    from orchestrator.bench import trainer as bench

    seen: list[bool] = []
    real_build = bench.build_model

    def spying_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.matmul.allow_tf32))
        return model

    monkeypatch.setattr(bench, "build_model", spying_build)
    settings = bench.TrainerBenchSettings(size="micro", img=16, patch=4, registers=0, batch=4, steps=1, warmup=1)
    cfg = bench.train_config(settings)
    cpu = torch.device("cpu")
    batches = bench.prebuilt_batches(cfg, cpu)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as Trainer(cfg, cuda) leaves it
    try:
        assert bench.baseline_throughput(cfg, cpu, 1, 1, batches) > 0
        assert seen and not any(seen)
        torch.backends.cuda.matmul.allow_tf32 = True
        ours, plain = bench.paired_throughput(cfg, cpu, 2, 1, batches, rounds=2)  # alternating blocks
        assert ours > 0 and plain > 0 and len(seen) == 2 + 3 and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32  # the flags are put back afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.slow
def test_overhead_bench_runs_the_sweep_and_the_bare_pool(tmp_path) -> None:
    result = run_bench("overhead", "--trials", "2", "--steps", "20", "--parallel", "2", "--repeat", "2", timeout=900)
    for key in ("sweep_wall_s", "bare_wall_s", "ratio", "trials", "steps"):
        assert key in result
    assert result["trials"] == 2 and result["steps"] == 20 and result["repeat"] == 2
    # Of two pairs the lower ratio is the median pair's; its walls give that ratio.
    assert len(result["ratios"]) == 2 and result["ratio"] == pytest.approx(min(result["ratios"]))
    assert result["sweep_wall_s"] / result["bare_wall_s"] == pytest.approx(result["ratio"])
    assert result["sweep"]["trial_runs"] == 2  # one MLflow child run per trial, in each sweep's own store
    assert result["sweep"]["step_ms"] > 0 and result["bare"]["step_ms"] > 0  # two log windows each


def test_generated_spec_is_a_valid_sweep_of_identical_trials(tmp_path) -> None:
    spec = parse_spec(sweep_spec(bench_train_config(steps=20), trials=3, parallel=2, storage=tmp_path))
    assert spec.seeds == [0, 1, 2] and spec.resources.cpu == 1 and spec.max_concurrent == 2
    assert spec.train.steps == 20 and spec.train.eval_every == 10


def test_repeated_pairs_alternate_and_report_medians() -> None:
    assert [pair_order(i) for i in range(3)] == [("bare", "sweep"), ("sweep", "bare"), ("bare", "sweep")]
    pairs = [
        {"bare": {"wall_s": 100.0, "id": 0}, "sweep": {"wall_s": 130.0, "id": 0}},  # 1.30
        {"bare": {"wall_s": 80.0, "id": 1}, "sweep": {"wall_s": 88.0, "id": 1}},  # 1.10
        {"bare": {"wall_s": 70.0, "id": 2}, "sweep": {"wall_s": 84.0, "id": 2}},  # 1.20
    ]
    summary = summarize_pairs(pairs)
    assert summary["ratios"] == pytest.approx([1.3, 1.1, 1.2])
    assert summary["ratio"] == pytest.approx(1.2)  # the median of the ratios, not a ratio of medians (1.10)
    # The walls come from that same pair, so that walls, ratio and extra seconds agree.
    assert summary["bare_wall_s"] == 70.0 and summary["sweep_wall_s"] == 84.0 and summary["extra_s"] == 14.0
    assert summary["pairs"] == pairs
    assert summary["bare"]["id"] == summary["sweep"]["id"] == 2  # the breakdown of the median pair
    single = summarize_pairs(pairs[:1])
    assert single["ratio"] == pytest.approx(1.3) and single["extra_s"] == 30.0


def test_the_report_has_a_row_per_pair_then_the_median_pair() -> None:
    def side(wall: float, step_ms: float, first_log: float | None) -> dict:
        return {
            "wall_s": wall, "step_ms": step_ms, "to_first_training_s": 5.0, "to_first_log_s": first_log,
            "train_s_mean": 15.0, "driver_start_s": 5.0, "to_first_trial_s": 9.0, "trial_s_mean": 16.0,
            "gap_s_mean": 0.1, "after_last_trial_s": 1.5,
        }

    pairs = [
        {"bare": side(70.0, 75.0, 6.2), "sweep": side(98.0, 92.0, 14.5)},
        {"bare": side(72.0, 76.0, 6.0), "sweep": side(80.0, 77.0, None)},
    ]
    head = {"trials": 8, "steps": 200, "parallel": 2, "load_avg_1m": 2.0, "config": {"log_every": 10}}
    report = format_overhead_result({**head, **summarize_pairs(pairs)})
    lines = report.splitlines()
    assert lines[2].split()[:5] == ["1", "bare", "70.0", "98.0", "1.40"] and "92.0 ms / 75.0 ms" in lines[2]
    assert "14.5 / 6.2" in lines[2]  # start to the first training-loss window, sweep / bare
    assert lines[3].split()[:5] == ["2", "sweep", "72.0", "80.0", "1.11"] and "n/a / 6.0" in lines[3]
    assert "ratio 1.11" in report and "ratio 1.40" not in report  # the lower of two middle pairs


def test_slot_gaps_follow_each_slot() -> None:
    # Two slots: trials 0 and 1 start together; 2 follows 0 after 1 s, 3 follows 1 after 3 s.
    spans = [(0.0, 10.0), (0.0, 12.0), (11.0, 20.0), (15.0, 25.0)]
    assert sorted(slot_gaps(spans)) == [1.0, 3.0]
    assert slot_gaps([(0.0, 1.0)]) == []


def test_training_pace_is_the_median_window() -> None:
    # 10 steps per window at 0.1 s/step, one window slowed by an evaluation, one of 5 steps.
    stamps = [(10, 1.0), (20, 2.0), (30, 3.0), (40, 6.0), (50, 7.0), (55, 7.5)]
    assert median_step_s(stamps) == pytest.approx(0.1)
    assert median_step_s(list(reversed(stamps))) == pytest.approx(0.1)
    assert median_step_s([(10, 1.0)]) is None


def test_peak_table_prefers_specific_names(monkeypatch) -> None:
    cuda = torch.device("cuda")
    for name, tflops in [
        ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A10G", 125), ("NVIDIA A10", 125), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
        ("NVIDIA L40", None), ("Some Future GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        peak = devices.peak_flops(cuda)
        assert (peak is None if tflops is None else peak == tflops * 1e12), name
    assert devices.peak_flops(torch.device("cpu")) is None
    # The memory table follows the same names: the NVL is a 94 GB part, the A100 80GB its own row.
    assert GPU_MEMORY_GB[match_gpu_name("NVIDIA H100 NVL")] == 94
    assert match_gpu_name("NVIDIA A100-SXM4-80GB") == "A100 80GB" and GPU_MEMORY_GB["A100"] == 40
    assert devices.mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    assert devices.mfu(1e9, 100.0, None) is None


def test_store_bench_reads_probe_cost_and_sizes_from_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from helpers_mlflow_store import write_sweep
    from trainers.probes import names

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seeded = write_sweep(uri, sweep_name="costs", register_counts=(0, 4))
    client = MlflowClient(uri)
    run_id = seeded.trial_runs[4][0]
    client.log_metric(run_id, names.PROBE_SECONDS, 0.5, step=5)
    (tmp_path / "norms.npz").write_bytes(b"x" * 1000)
    client.log_artifact(run_id, str(tmp_path / "norms.npz"), "probes/step_0000005")

    result = run_bench("store", "--experiment", "costs", "--tracking-uri", uri, timeout=120)
    assert result["trials"] == 2 and result["launches"] == 1
    assert result["artifact_bytes_per_trial_max"] == 1000
    assert result["artifact_bytes_per_trial_mean"] == 500
    assert 0 < result["probe_share_max"] and result["probe_share_mean"] == result["probe_share_max"] / 2
    assert result["metric_points_per_trial_max"] >= 1


def test_startup_report_has_a_row_per_pair_and_the_median_saving() -> None:
    from orchestrator.bench.startup import format_startup_result

    result = {"pairs": [{"first": "beside", "beside": 5.0, "serial": 6.5, "saved": 1.5}], "median_saved_s": 1.5}
    text = format_startup_result(result)
    assert "beside" in text.splitlines()[1] and text.endswith("median saved per launch: 1.50 s")
