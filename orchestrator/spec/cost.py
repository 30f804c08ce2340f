"""The spec's `cost` block: which GPU the time and money estimate of `--dry-run` assumes.

The tables (peak TFLOP/s, memory, USD per GPU-hour, measured throughput) live in
trainers/cost.py; here a spec picks a GPU type and may override its price, its MFU, its memory
and, for a GPU the table does not know, its peak.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.cost import DEFAULT_GPU, DEFAULT_MFU, GPU_MEMORY_GB, GPU_PEAK_TFLOPS, GPU_USD_PER_HOUR


class CostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu_type: str = Field(default=DEFAULT_GPU, min_length=1, description=f"one of {', '.join(GPU_PEAK_TFLOPS)}, or any name with peak_tflops")
    usd_per_gpu_hour: float | None = Field(default=None, ge=0, description="default: the price table's value for gpu_type")
    mfu: float = Field(default=DEFAULT_MFU, gt=0, le=1, description="model FLOPs utilisation the FLOPs estimate assumes")
    peak_tflops: float | None = Field(default=None, gt=0, description="bf16 dense peak; default: the table's value for gpu_type")
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="memory of one GPU, for the plan's memory check; default: the table's value for gpu_type"
    )

    @model_validator(mode="after")
    def _known_or_given(self) -> "CostConfig":
        if self.gpu_type not in GPU_PEAK_TFLOPS and (self.peak_tflops is None or self.usd_per_gpu_hour is None):
            raise ValueError(
                f"gpu_type {self.gpu_type!r} is not in the table ({', '.join(GPU_PEAK_TFLOPS)}); "
                "give its peak_tflops and usd_per_gpu_hour"
            )
        return self

    @property
    def price(self) -> float:
        return self.usd_per_gpu_hour if self.usd_per_gpu_hour is not None else GPU_USD_PER_HOUR[self.gpu_type]

    @property
    def peak(self) -> float:
        return self.peak_tflops if self.peak_tflops is not None else GPU_PEAK_TFLOPS[self.gpu_type]

    @property
    def memory_gb(self) -> float | None:
        """GB of one GPU; None for a GPU the table does not know and the spec does not size."""
        return self.gpu_memory_gb if self.gpu_memory_gb is not None else GPU_MEMORY_GB.get(self.gpu_type)
