"""Device facts the benchmarks need: a name, a clock that waits for the GPU, and peak FLOP/s."""

from __future__ import annotations

import os
import platform

import torch

from trainers.cost import GPU_PEAK_TFLOPS, match_gpu_name


def bench_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak in FLOP/s, or None on a CPU or an unknown GPU (the table is trainers/cost.py's)."""
    if device.type != "cuda":
        return None
    gpu = match_gpu_name(torch.cuda.get_device_name(device))
    return None if gpu is None else GPU_PEAK_TFLOPS[gpu] * 1e12


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_image: float, imgs_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
    return None if peak is None else flops_per_image * imgs_per_s / peak
