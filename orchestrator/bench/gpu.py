"""`python -m orchestrator.bench gpu [--json]`: the acceptance run for a first GPU, at most 8 minutes on one H100.

Parts, in this order, each in a process of its own under a share of the budget:

trainer     images/s and MFU of Trainer.train_step for ViT-S/16 and ViT-B/16 at 224, bf16, registers
            0 and 16, eager then compiled (the compiled rows last: they cost the most time);
pipeline    images/s of the shards source on the device, decode gpu and then cpu, on JPEG shards
            the part writes first (synthetic ImageNet-sized pictures, the project's shard writer);
objectives  images/s of supervised, DINO (2 x 224 + 8 x 96 crops, 65536 prototypes) and CLIP at
            ViT-B/16, with the peak memory beside the plan's estimate of it (trainers/memory.py);
ddp         one timed DDP step of 2 workers (NCCL) when 2 or more GPUs are visible.

A part's process is stopped at its budget, so the whole run cannot pass the total: an item
that would start too late is skipped, one stopped midway is reported so, and the JSON says
which. On a CPU (or with --reduced) every part runs at tiny sizes and a few steps, with
torch.compile's eager backend and, with --ddp-backend gloo, the 2-worker step over gloo: the
CI test that keeps this command from rotting.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from orchestrator.bench.devices import bench_device, device_name
from orchestrator.bench.gpu_parts import GpuBenchSettings, run_part

# Share of the total budget each part may take (the rest covers process starts and the report).
PART_SHARES = {"trainer": 0.47, "pipeline": 0.14, "objectives": 0.24, "ddp": 0.10}
STOP_GRACE_S = 10.0  # a part past its budget gets this long to stop before it is killed


def run_gpu_bench(settings: GpuBenchSettings, device: torch.device, ddp_backend: str | None = None,
                  parts: tuple[str, ...] = tuple(PART_SHARES), target: Callable[..., None] = run_part,
                  grace_s: float = STOP_GRACE_S) -> dict[str, Any]:
    """Every part in turn, each in a process of its own stopped at its share of settings.budget_s.
    target: what a part's process runs (gpu_parts.run_part; tests give another)."""
    start = time.time()
    end = start + settings.budget_s
    result: dict[str, Any] = {
        "benchmark": "gpu", "device": device_name(device), "reduced": settings.reduced,
        "budget_s": settings.budget_s, "settings": asdict(settings), "parts": {},
    }
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    for part in parts:
        now = time.time()
        budget = min(PART_SHARES[part] * settings.budget_s, end - now - grace_s)
        if budget <= 0:
            result["parts"][part] = {"skipped": "no time left in the total budget"}
            continue
        result["parts"][part] = _run_part_process(ctx, part, settings, device, now + budget, ddp_backend, target, grace_s)
    result["wall_s"] = time.time() - start
    return result


def _run_part_process(ctx: Any, part: str, settings: GpuBenchSettings, device: torch.device, deadline: float,
                      ddp_backend: str | None, target: Callable[..., None], grace_s: float) -> dict[str, Any]:
    out = ctx.Queue()
    start = time.time()
    proc = ctx.Process(
        target=target, args=(part, json.dumps(asdict(settings)), str(device), deadline, ddp_backend, out), daemon=False
    )
    proc.start()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"budget_s": round(deadline - start, 1)}
    done = False
    while not done:
        try:
            message = out.get(timeout=max(0.1, deadline + grace_s - time.time()))
        except queue.Empty:
            if proc.is_alive() and time.time() < deadline + grace_s:
                continue
            break
        if "done" in message:
            done = True
        elif "device_name" in message:
            report["device_name"] = message["device_name"]
        elif "item" in message:
            rows.append(message)
        else:
            report.update(message)
    if done:  # the part finished: let its process exit (temporary files, CUDA teardown)
        proc.join(max(1.0, deadline + grace_s - time.time()))
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        if not done:
            report["stopped"] = f"at its budget of {deadline - start:.0f} s: the item then running did not finish"
    proc.join()
    if not done and "stopped" not in report:
        report["error"] = f"the part's process ended with exit code {proc.exitcode}"
    report["rows"] = rows
    report["wall_s"] = round(time.time() - start, 1)
    return report


def _figure(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_gpu_result(r: dict[str, Any]) -> str:
    lines = [f"device      {r['device']}{' (reduced form)' if r['reduced'] else ''}",
             f"budget      {r['budget_s']:.0f} s, ran {r['wall_s']:.0f} s"]
    for part, report in r["parts"].items():
        header = f"{part:10s}  {report.get('wall_s', 0):.0f} s of {report.get('budget_s', 0):.0f}"
        for key in ("skipped", "stopped", "error", "reason"):
            if key in report:
                header += f"; {key}: {report[key]}"
        lines.append(header)
        for row in report.get("rows", []):
            if "skipped" in row or "error" in row:
                lines.append(f"  {row['item']:38s} {row.get('skipped') or row.get('error')}")
            elif part == "ddp":
                lines.append(f"  {row['item']:38s} step {row['step_s'] * 1000:8.1f} ms, init {row['init_s']:.1f} s")
            else:
                mfu = row.get("mfu")
                memory = row.get("memory_gb")
                lines.append(
                    f"  {row['item']:38s} {_figure(row['images_per_s']):>10s} img/s"
                    + ("" if mfu is None else f"  MFU {100 * mfu:5.1f}%")
                    + ("" if memory is None else f"  {memory:.1f} GB (estimate {row['memory_estimate_gb']:.1f})")
                )
    return "\n".join(lines)


def settings_for(device: torch.device, reduced: bool | None, budget_s: float | None) -> GpuBenchSettings:
    use_reduced = reduced if reduced is not None else device.type != "cuda"
    if use_reduced:
        return GpuBenchSettings.reduced_form(budget_s or 420.0)
    settings = GpuBenchSettings.full()
    return settings if budget_s is None else GpuBenchSettings(**{**asdict(settings), "budget_s": budget_s})


def main_gpu(device_arg: str | None, reduced: bool | None, budget_s: float | None, ddp_backend: str | None) -> dict[str, Any]:
    device = bench_device(device_arg)
    return run_gpu_bench(settings_for(device, reduced, budget_s), device, ddp_backend)
