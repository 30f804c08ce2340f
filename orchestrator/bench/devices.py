"""Device facts the benchmarks need: a name, a clock that waits for the GPU, and peak FLOP/s."""

from __future__ import annotations

import os
import platform

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity). Matched by
# substring of torch.cuda.get_device_name() in this order, so that the more specific
# names win ('H100 PCIe' before 'H100', 'A100' and 'A10G' before 'A10', 'L40S' before 'L4').
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
)


def bench_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak in FLOP/s, or None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_image: float, imgs_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
    return None if peak is None else flops_per_image * imgs_per_s / peak
